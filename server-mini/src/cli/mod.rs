//! The `meswitch` command tree.
//!
//! Each subcommand lives in its own file as a clap `Parser` struct that
//! implements [`Run`], and is registered with one line in [`SUBCOMMANDS`].
//! Errors reach `main` as `anyhow::Error` and are printed as one line.

use std::ffi::OsString;

use clap::{ArgMatches, CommandFactory, FromArgMatches};

mod compress;
mod decompress;
mod generate;
mod inspect;
mod perplexity;
mod router;
mod serve;
mod synth;
mod tokenize;

/// What a subcommand does once its arguments are parsed.
pub trait Run {
    fn run(self) -> anyhow::Result<()>;
}

/// One registered subcommand: how to build its clap definition and run it.
pub struct Subcommand {
    pub command: fn() -> clap::Command,
    pub run: fn(&ArgMatches) -> anyhow::Result<()>,
}

impl Subcommand {
    pub const fn of<A: CommandFactory + FromArgMatches + Run>() -> Subcommand {
        Subcommand {
            command: A::command,
            run: run_parsed::<A>,
        }
    }
}

fn run_parsed<A: FromArgMatches + Run>(matches: &ArgMatches) -> anyhow::Result<()> {
    A::from_arg_matches(matches)?.run()
}

/// Every subcommand of `meswitch`, in help order.
pub const SUBCOMMANDS: &[Subcommand] = &[
    Subcommand::of::<synth::SynthArgs>(),
    Subcommand::of::<compress::CompressArgs>(),
    Subcommand::of::<inspect::InspectArgs>(),
    Subcommand::of::<decompress::DecompressArgs>(),
    Subcommand::of::<tokenize::TokenizeArgs>(),
    Subcommand::of::<generate::GenerateArgs>(),
    Subcommand::of::<perplexity::PerplexityArgs>(),
    Subcommand::of::<router::RouterArgs>(),
    Subcommand::of::<serve::ServeArgs>(),
];

fn root_command() -> clap::Command {
    SUBCOMMANDS.iter().fold(
        clap::Command::new("meswitch")
            .about("Serve many fine-tuned experts of one base LLM from one GPU (ME-Switch)")
            .version(env!("CARGO_PKG_VERSION"))
            .subcommand_required(true)
            .arg_required_else_help(true),
        |root, sub| root.subcommand((sub.command)()),
    )
}

/// Parses `args` (program name first) and runs the chosen subcommand.
///
/// `--help` / `--version` print and return `Ok`; a usage error comes back as
/// an error whose message is clap's first line.
pub fn main<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = match root_command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.print()?;
                return Ok(());
            }
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            anyhow::bail!("{first} (try --help)");
        }
    };
    let (name, sub_matches) = matches
        .subcommand()
        .ok_or_else(|| anyhow::anyhow!("no subcommand given (try --help)"))?;
    let sub = SUBCOMMANDS
        .iter()
        .find(|s| (s.command)().get_name() == name)
        .ok_or_else(|| anyhow::anyhow!("unknown subcommand {name}"))?;
    (sub.run)(sub_matches)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} {msg}")
    {
        bar.set_style(style);
    }
    bar
}
