//! Expert residency under small budgets: LRU eviction order, pinned and
//! in-use experts never evicted, prefetch of a queued request's expert
//! while another decodes, admin load/unload, a vanished expert file.

mod engine_support;

use engine_support::{collect, family, file_size, greedy, next_event, EngineStart, Family};
use meswitch_server::engine::{
    Engine, EngineConfig, EngineError, Event, ExpertChoice, ExpertSource, GenRequest, Tier,
};

/// A device budget that holds `n` of the family's experts and not `n + 1`.
fn budget_for(fam: &Family, n: u64) -> u64 {
    let sizes: Vec<u64> = fam.experts.iter().map(|e| file_size(&e.path)).collect();
    let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
    assert!(n * hi < (n + 1) * lo, "experts differ too much in size");
    n * hi
}

fn start(fam: &Family, experts: Vec<ExpertSource>, config: EngineConfig) -> Engine {
    EngineStart {
        experts,
        config,
        ..fam.engine_start()
    }
    .start()
    .unwrap()
}

fn request(expert: &str, max_tokens: usize) -> GenRequest {
    greedy(
        vec![7, 8, 9],
        ExpertChoice::Named(expert.to_string()),
        max_tokens,
    )
}

fn run(engine: &Engine, expert: &str) {
    let out = collect(&mut engine.submit(request(expert, 4)).unwrap());
    assert_eq!(out.error, None);
    assert_eq!(out.expert.as_deref(), Some(expert));
}

fn tiers(engine: &Engine) -> Vec<(String, Tier)> {
    engine
        .experts()
        .into_iter()
        .map(|e| (e.name, e.tier))
        .collect()
}

fn tier(engine: &Engine, name: &str) -> Tier {
    engine
        .experts()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap()
        .tier
}

#[test]
fn least_recently_used_expert_is_evicted_first() {
    let fam = family(3, 3);
    let config = EngineConfig {
        device_budget_bytes: budget_for(&fam, 2),
        ..Default::default()
    };
    let engine = start(&fam, fam.experts.clone(), config);
    // Start-up fills the device in registration order.
    let t = |a, b, c| {
        vec![
            ("e0".to_string(), a),
            ("e1".to_string(), b),
            ("e2".to_string(), c),
        ]
    };
    assert_eq!(tiers(&engine), t(Tier::Device, Tier::Device, Tier::Disk));
    run(&engine, "e0");
    run(&engine, "e2"); // e1 is the least recently used
    assert_eq!(tiers(&engine), t(Tier::Device, Tier::Host, Tier::Device));
    run(&engine, "e1"); // now e0 is
    assert_eq!(tiers(&engine), t(Tier::Host, Tier::Device, Tier::Device));
    let s = engine.stats();
    assert_eq!(
        (s.expert_loads, s.expert_evictions, s.host_loads),
        (4, 2, 3)
    );
    let e0 = file_size(&fam.experts[0].path);
    assert_eq!(s.host_bytes, e0);
    assert_eq!(
        s.device_bytes,
        s.disk_bytes + s.host_bytes + s.device_bytes - e0
    );
}

#[test]
fn pinned_expert_is_never_evicted() {
    let fam = family(3, 3);
    let config = EngineConfig {
        device_budget_bytes: budget_for(&fam, 2),
        pinned: vec!["e2".to_string()],
        ..Default::default()
    };
    let engine = start(&fam, fam.experts.clone(), config);
    assert_eq!(tier(&engine, "e2"), Tier::Device);
    for name in ["e0", "e1", "e0", "e1"] {
        run(&engine, name);
        assert_eq!(tier(&engine, name), Tier::Device);
        assert_eq!(tier(&engine, "e2"), Tier::Device, "after {name}");
    }
    assert!(engine.stats().expert_evictions >= 3);
    let pinned: Vec<_> = engine.experts().into_iter().filter(|e| e.pinned).collect();
    assert_eq!(pinned.len(), 1);
}

#[test]
fn pinned_experts_over_budget_are_refused_at_start() {
    let fam = family(2, 3);
    let config = EngineConfig {
        device_budget_bytes: budget_for(&fam, 1),
        pinned: vec!["e0".to_string(), "e1".to_string()],
        ..Default::default()
    };
    let r = EngineStart {
        config,
        ..fam.engine_start()
    }
    .start();
    let Err(EngineError::ExpertLoad { name, .. }) = r else {
        panic!("two pinned experts in a one-expert budget must be refused");
    };
    assert_eq!(name, "e1");
}

#[test]
fn host_tier_keeps_the_most_recent_evictions_within_its_budget() {
    let fam = family(3, 3);
    let config = EngineConfig {
        device_budget_bytes: budget_for(&fam, 1),
        host_budget_bytes: budget_for(&fam, 1),
        ..Default::default()
    };
    let engine = start(&fam, fam.experts.clone(), config);
    run(&engine, "e1"); // e0 falls to the host
    run(&engine, "e2"); // e0 leaves the host for e2's read, then e1 falls there
    let t = tiers(&engine);
    assert_eq!(
        t,
        vec![
            ("e0".to_string(), Tier::Disk),
            ("e1".to_string(), Tier::Host),
            ("e2".to_string(), Tier::Device)
        ]
    );
    let s = engine.stats();
    assert_eq!(
        (s.host_loads, s.host_evictions, s.expert_evictions),
        (3, 1, 2)
    );
    run(&engine, "e1"); // back from the host, no read
    assert_eq!(engine.stats().host_loads, 3);
}

/// With room for one expert, B (e1) waits while A uses e0; e1 is read to
/// the host meanwhile, and moves to the device only once A is done.
#[test]
fn in_use_expert_is_never_evicted_and_the_next_is_prefetched() {
    let fam = family(2, 3);
    let config = EngineConfig {
        device_budget_bytes: budget_for(&fam, 1),
        max_running: 2,
        ..Default::default()
    };
    let engine = start(&fam, fam.experts.clone(), config);
    assert_eq!(tier(&engine, "e1"), Tier::Disk);
    let mut a = engine.submit(request("e0", 1500)).unwrap();
    assert!(matches!(next_event(&mut a), Some(Event::Started { .. })));
    let mut b = engine.submit(request("e1", 4)).unwrap();
    let mut saw_prefetch = false;
    loop {
        match next_event(&mut a).unwrap() {
            Event::Text(_) => {
                assert_eq!(tier(&engine, "e0"), Tier::Device, "e0 is in use");
                saw_prefetch |= tier(&engine, "e1") == Tier::Host;
                assert!(b.events.try_recv().is_err(), "B started while A runs");
            }
            Event::Done { .. } => break,
            e => panic!("unexpected {e:?}"),
        }
    }
    assert!(saw_prefetch, "e1 was not read to the host while A decoded");
    let out = collect(&mut b);
    assert_eq!(out.error, None);
    assert_eq!(tier(&engine, "e1"), Tier::Device);
    assert_eq!(tier(&engine, "e0"), Tier::Host);
}

#[test]
fn admin_unload_refuses_an_expert_in_use_and_load_adds_one() {
    let fam = family(2, 3);
    let engine = start(&fam, vec![fam.experts[0].clone()], EngineConfig::default());
    let mut a = engine.submit(request("e0", 1500)).unwrap();
    assert!(matches!(next_event(&mut a), Some(Event::Started { .. })));
    assert!(matches!(
        engine.unload_expert("e0"),
        Err(EngineError::ExpertInUse(_))
    ));
    drop(a);
    // The slot is freed at the next step; then the unload goes through.
    let until = std::time::Instant::now() + engine_support::EVENT_TIMEOUT;
    while engine.unload_expert("e0").is_err() {
        assert!(std::time::Instant::now() < until);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(engine.experts().is_empty());
    assert!(matches!(
        engine.unload_expert("e0"),
        Err(EngineError::UnknownExpert(_))
    ));
    assert!(engine.submit(request("e0", 4)).is_err());

    engine.load_expert(fam.experts[1].clone()).unwrap();
    assert!(matches!(
        engine.load_expert(fam.experts[1].clone()),
        Err(EngineError::DuplicateExpert(_))
    ));
    let bad = ExpertSource {
        name: "bad".into(),
        path: fam.base.join("config.json"),
    };
    assert!(matches!(
        engine.load_expert(bad),
        Err(EngineError::ExpertLoad { .. })
    ));
    assert_eq!(tier(&engine, "e1"), Tier::Device);
    run(&engine, "e1");
}

#[test]
fn a_vanished_expert_file_fails_only_its_requests() {
    let fam = family(2, 3);
    let config = EngineConfig {
        device_budget_bytes: budget_for(&fam, 1),
        ..Default::default()
    };
    let engine = start(&fam, fam.experts.clone(), config);
    assert_eq!(tier(&engine, "e1"), Tier::Disk);
    std::fs::remove_file(&fam.experts[1].path).unwrap();
    let mut bad = engine.submit(request("e1", 4)).unwrap();
    let mut good = engine.submit(request("e0", 4)).unwrap();
    let out = collect(&mut bad);
    assert!(out.error.unwrap().contains("e1"));
    assert_eq!(collect(&mut good).error, None);
    assert_eq!(engine.stats().failed_requests, 1);
}
