fn main() {
    eprintln!("meswitch: no commands yet");
    std::process::exit(2);
}
