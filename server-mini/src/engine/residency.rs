//! Where each expert lives, and what moves when a budget is full.
//!
//! ```text
//!   Disk ──loader thread: read + check──▶ Host ──add_expert──▶ Device
//!    ▲                                     │ ▲                   │
//!    └──── host LRU eviction (drop) ───────┘ └── remove_expert ──┘
//!                                               (device LRU eviction)
//! ```
//!
//! Tiers are exclusive: an expert is in exactly one place (`Loading` counts
//! as disk). The host tier holds the checked, decoded expert (what a GPU
//! backend uploads), so an expert evicted from the device falls back to the
//! host and returns without touching the disk. Sizes are the expert file's
//! bytes, known at registration, so budgets are decided before loading.
//!
//! Eviction is least-recently-used per tier. Never evicted from the device:
//! pinned experts and experts a running sequence uses (`in_use > 0`). Never
//! evicted from the host: experts a waiting request needs (`protect`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::{EngineError, ExpertSource, ExpertStatus, Tier};
use crate::model::{Backend, Expert, ExpertId, ModelError};

pub(crate) enum Place {
    Disk,
    /// The loader thread is reading it.
    Loading,
    Host(Box<Expert>),
    Device(ExpertId),
}

pub(crate) struct Entry {
    pub path: PathBuf,
    pub bytes: u64,
    pub pinned: bool,
    pub place: Place,
    /// Clock value of the last use; the smallest is evicted first.
    pub last_used: u64,
    /// Running sequences that use it.
    pub in_use: usize,
    /// Tells this registration from an earlier one of the same name: a
    /// load started before an unload must not land after it.
    pub epoch: u64,
}

impl Entry {
    pub fn tier(&self) -> Tier {
        match self.place {
            Place::Disk | Place::Loading => Tier::Disk,
            Place::Host(_) => Tier::Host,
            Place::Device(_) => Tier::Device,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub device_loads: u64,
    pub device_evictions: u64,
    pub host_loads: u64,
    pub host_evictions: u64,
}

pub(crate) struct Residency {
    entries: BTreeMap<String, Entry>,
    clock: u64,
    next_epoch: u64,
    device_budget: u64,
    host_budget: u64,
    pub counters: Counters,
}

/// A read the loader thread is to do.
pub(crate) struct LoadJob {
    pub name: String,
    pub path: PathBuf,
    pub epoch: u64,
}

impl Residency {
    pub fn new(device_budget: u64, host_budget: u64) -> Residency {
        Residency {
            entries: BTreeMap::new(),
            clock: 0,
            next_epoch: 0,
            device_budget,
            host_budget,
            counters: Counters::default(),
        }
    }

    /// Adds an expert on the disk tier. An expert that does not fit the
    /// device budget next to the pinned experts could never serve, so it is
    /// refused here (register pinned experts first).
    pub fn register(&mut self, src: &ExpertSource, pinned: bool) -> Result<(), EngineError> {
        if self.entries.contains_key(&src.name) {
            return Err(EngineError::DuplicateExpert(src.name.clone()));
        }
        let load_error = |why: String| EngineError::ExpertLoad {
            name: src.name.clone(),
            why,
        };
        let bytes = std::fs::metadata(&src.path)
            .map_err(|e| load_error(format!("{}: {e}", src.path.display())))?
            .len();
        let pinned_bytes: u64 = self
            .entries
            .values()
            .filter(|e| e.pinned)
            .map(|e| e.bytes)
            .sum();
        if bytes + pinned_bytes > self.device_budget {
            return Err(load_error(format!(
                "{bytes} bytes do not fit the device budget of {} bytes \
                 next to {pinned_bytes} bytes of pinned experts",
                self.device_budget
            )));
        }
        self.next_epoch += 1;
        self.entries.insert(
            src.name.clone(),
            Entry {
                path: src.path.clone(),
                bytes,
                pinned,
                place: Place::Disk,
                last_used: 0,
                in_use: 0,
                epoch: self.next_epoch,
            },
        );
        Ok(())
    }

    /// Registers an expert already read and checked (admin load): it lands
    /// on the host tier, and on the device when that has room without
    /// evicting anything.
    pub fn register_loaded<B: Backend>(
        &mut self,
        src: &ExpertSource,
        expert: Expert,
        backend: &mut B,
    ) -> Result<(), EngineError> {
        self.register(src, false)?;
        let now = self.tick();
        let e = self.entries.get_mut(&src.name).expect("just registered");
        e.place = Place::Host(Box::new(expert));
        e.last_used = now;
        self.counters.host_loads += 1;
        let bytes = e.bytes;
        if self.bytes_in(Tier::Device) + bytes <= self.device_budget {
            self.promote(&src.name, backend, &BTreeSet::new())?;
        } else {
            self.enforce_host_budget(&BTreeSet::from([src.name.clone()]));
        }
        Ok(())
    }

    /// Reads an expert now, on this thread (start-up), and puts it on the
    /// device if it fits without evicting anything (pinned experts must).
    pub fn load_now<B: Backend>(
        &mut self,
        name: &str,
        parser: &crate::model::ExpertParser,
        backend: &mut B,
    ) -> Result<bool, EngineError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| EngineError::UnknownExpert(name.to_string()))?;
        if self.bytes_in(Tier::Device) + e.bytes > self.device_budget {
            if e.pinned {
                return Err(EngineError::Config(format!(
                    "pinned expert {name:?} does not fit the device budget of {} bytes \
                     next to the other pinned experts",
                    self.device_budget
                )));
            }
            return Ok(false);
        }
        let job = self
            .start_load(name)
            .expect("a registered expert starts on disk");
        let result = parser.open(&job.path);
        self.finish_load(&job, result, &BTreeSet::from([name.to_string()]))
            .map_err(|why| EngineError::ExpertLoad {
                name: name.to_string(),
                why,
            })?;
        Ok(self.promote(name, backend, &BTreeSet::new())?.is_some())
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn device_id(&self, name: &str) -> Option<ExpertId> {
        match self.entries.get(name)?.place {
            Place::Device(id) => Some(id),
            _ => None,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A running sequence starts using the (device-resident) expert.
    pub fn acquire(&mut self, name: &str) {
        let now = self.tick();
        if let Some(e) = self.entries.get_mut(name) {
            e.in_use += 1;
            e.last_used = now;
        }
    }

    pub fn release(&mut self, name: &str) {
        let now = self.tick();
        if let Some(e) = self.entries.get_mut(name) {
            e.in_use = e.in_use.saturating_sub(1);
            e.last_used = now;
        }
    }

    /// Disk → Loading: the read the loader thread is to do, or `None` when
    /// the expert is not on disk (already loading or loaded), unknown, or
    /// the host tier has no room for it now. Room: what is on the host or
    /// being read plus this expert fits the host budget, or nothing is
    /// being read (so one read always proceeds, even over budget).
    pub fn start_load(&mut self, name: &str) -> Option<LoadJob> {
        let e = self.entries.get(name)?;
        if !matches!(e.place, Place::Disk) {
            return None;
        }
        let loading: Vec<u64> = (self.entries.values())
            .filter(|e| matches!(e.place, Place::Loading))
            .map(|e| e.bytes)
            .collect();
        let reserved = self.bytes_in(Tier::Host) + loading.iter().sum::<u64>();
        if !loading.is_empty() && reserved + e.bytes > self.host_budget {
            return None;
        }
        let e = self.entries.get_mut(name).expect("looked up above");
        e.place = Place::Loading;
        Some(LoadJob {
            name: name.to_string(),
            path: e.path.clone(),
            epoch: e.epoch,
        })
    }

    /// Loading → Host with the loader's result. A stale result (the expert
    /// was unloaded since) is dropped; a failed read returns the expert to
    /// the disk tier and the error to the caller.
    pub fn finish_load(
        &mut self,
        job: &LoadJob,
        result: Result<Expert, ModelError>,
        protect: &BTreeSet<String>,
    ) -> Result<(), String> {
        let Some(e) = self.entries.get_mut(&job.name) else {
            return Ok(());
        };
        if e.epoch != job.epoch || !matches!(e.place, Place::Loading) {
            return Ok(());
        }
        match result {
            Ok(expert) => {
                e.place = Place::Host(Box::new(expert));
                self.counters.host_loads += 1;
                let now = self.tick();
                if let Some(e) = self.entries.get_mut(&job.name) {
                    e.last_used = now;
                }
                self.enforce_host_budget(protect);
                Ok(())
            }
            Err(err) => {
                e.place = Place::Disk;
                Err(err.to_string())
            }
        }
    }

    /// Host → Device, evicting least-recently-used device experts if
    /// needed. `Ok(None)`: not on the host, or no room can be made now.
    pub fn promote<B: Backend>(
        &mut self,
        name: &str,
        backend: &mut B,
        protect: &BTreeSet<String>,
    ) -> Result<Option<ExpertId>, EngineError> {
        let Some(e) = self.entries.get(name) else {
            return Err(EngineError::UnknownExpert(name.to_string()));
        };
        match e.place {
            Place::Device(id) => return Ok(Some(id)),
            Place::Host(_) => {}
            Place::Disk | Place::Loading => return Ok(None),
        }
        if !self.make_device_room(e.bytes, name, backend)? {
            return Ok(None);
        }
        let now = self.tick();
        let e = self.entries.get_mut(name).expect("looked up above");
        let Place::Host(expert) = std::mem::replace(&mut e.place, Place::Loading) else {
            unreachable!("checked above: the expert is on the host");
        };
        let id = backend.add_expert(*expert);
        e.place = Place::Device(id);
        e.last_used = now;
        self.counters.device_loads += 1;
        // Experts evicted to make room went to the host tier.
        self.enforce_host_budget(protect);
        Ok(Some(id))
    }

    fn bytes_in(&self, tier: Tier) -> u64 {
        self.entries
            .values()
            .filter(|e| e.tier() == tier)
            .map(|e| e.bytes)
            .sum()
    }

    /// Evicts device experts (LRU first) until `need` more bytes fit; false,
    /// evicting nothing, when pinned and in-use experts leave too little.
    fn make_device_room<B: Backend>(
        &mut self,
        need: u64,
        incoming: &str,
        backend: &mut B,
    ) -> Result<bool, EngineError> {
        let used = self.bytes_in(Tier::Device);
        if used + need <= self.device_budget {
            return Ok(true);
        }
        let mut victims: Vec<(u64, String, u64)> = self
            .entries
            .iter()
            .filter(|(n, e)| {
                n.as_str() != incoming
                    && matches!(e.place, Place::Device(_))
                    && !e.pinned
                    && e.in_use == 0
            })
            .map(|(n, e)| (e.last_used, n.clone(), e.bytes))
            .collect();
        victims.sort();
        let evictable: u64 = victims.iter().map(|v| v.2).sum();
        if used - evictable + need > self.device_budget {
            return Ok(false);
        }
        let mut used = used;
        for (_, name, bytes) in victims {
            if used + need <= self.device_budget {
                break;
            }
            let e = self.entries.get_mut(&name).expect("victims are entries");
            let Place::Device(id) = e.place else {
                unreachable!("victims are on the device");
            };
            let expert = backend.remove_expert(id)?;
            e.place = Place::Host(Box::new(expert));
            used -= bytes;
            self.counters.device_evictions += 1;
        }
        Ok(true)
    }

    /// Drops host experts (LRU first, never a protected one) until the host
    /// tier fits its budget. Protected experts may keep it over budget
    /// until they move to the device.
    fn enforce_host_budget(&mut self, protect: &BTreeSet<String>) {
        let mut used = self.bytes_in(Tier::Host);
        if used <= self.host_budget {
            return;
        }
        let mut victims: Vec<(u64, String)> = self
            .entries
            .iter()
            .filter(|(n, e)| matches!(e.place, Place::Host(_)) && !protect.contains(*n))
            .map(|(n, e)| (e.last_used, n.clone()))
            .collect();
        victims.sort();
        for (_, name) in victims {
            if used <= self.host_budget {
                break;
            }
            let e = self.entries.get_mut(&name).expect("victims are entries");
            e.place = Place::Disk;
            used -= e.bytes;
            self.counters.host_evictions += 1;
        }
    }

    /// Forgets an expert (dropping its weights from the backend); refused
    /// while a running sequence uses it.
    pub fn unregister<B: Backend>(
        &mut self,
        name: &str,
        backend: &mut B,
    ) -> Result<(), EngineError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| EngineError::UnknownExpert(name.to_string()))?;
        if e.in_use > 0 {
            return Err(EngineError::ExpertInUse(name.to_string()));
        }
        if let Place::Device(id) = e.place {
            backend.remove_expert(id)?;
        }
        self.entries.remove(name);
        Ok(())
    }

    pub fn statuses(&self) -> Vec<ExpertStatus> {
        self.entries
            .iter()
            .map(|(name, e)| ExpertStatus {
                name: name.clone(),
                tier: e.tier(),
                pinned: e.pinned,
                bytes: e.bytes,
                in_use: e.in_use,
            })
            .collect()
    }

    /// Bytes on the (disk, host, device) tiers.
    pub fn tier_bytes(&self) -> (u64, u64, u64) {
        (
            self.bytes_in(Tier::Disk),
            self.bytes_in(Tier::Host),
            self.bytes_in(Tier::Device),
        )
    }
}
