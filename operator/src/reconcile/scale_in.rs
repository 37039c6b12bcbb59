//! Scale-in without stranding mail: when an SmtpListener asks for fewer pods than its
//! StatefulSet runs, the pods that will go (the highest ordinals) are drained first —
//! they stop taking mail and hand their queues to the pods that stay — and the StatefulSet
//! shrinks only once every one of them reports itself drained. Their queue volumes are
//! deleted only after that, and a volume nobody drained is never deleted.
//!
//! [`plan`] is pure and keeps no memory: each reconcile recomputes it from the spec, the
//! StatefulSet and what the pods report, so an operator restart mid-drain just asks
//! again (the MTA's drain is idempotent). Scale-out is never delayed.
//!
//! A volume whose pod went without draining ([`left_behind`]) is drained by a Job on that
//! volume (see `render::workload::volume_drain_job`) and deleted only once marked drained.

use crate::pods::DrainReport;
use std::collections::BTreeMap;

/// Annotation on a queue PVC: its pod reported drained (empty queue, marker written), so
/// the volume may be deleted once the pod is gone. It holds only while no pod takes mail
/// on the volume again: [`stale_marks`] says which to clear.
pub const DRAINED_ANNOTATION: &str = "mail.petrel.dev/drained";

/// How long a draining pod keeps delivering before it hands the rest to its peers.
pub const DELIVER_FOR_SECS: u64 = 10;

/// What one leaving pod said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDrain {
    /// Its drain progress.
    Report(DrainReport),
    /// It could not be asked (not running, no IP, no answer).
    Unreachable(String),
}

/// The step a reconcile takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Pods the StatefulSet should run now.
    pub statefulset_replicas: i32,
    /// Ordinals to drain (ask, or ask again).
    pub drain: Vec<i32>,
    /// Ordinals that just finished draining: their volumes get [`DRAINED_ANNOTATION`]
    /// before the StatefulSet shrinks.
    pub drained: Vec<i32>,
    /// For the `ScalingIn` condition: what is happening, `None` when not scaling in.
    pub progress: Option<String>,
}

/// The plan for a listener that asks for `desired` pods while its StatefulSet runs
/// `current` (`None`: no StatefulSet yet), given what the leaving pods reported.
pub fn plan(
    name: &str,
    desired: i32,
    current: Option<i32>,
    reports: &BTreeMap<i32, PodDrain>,
) -> Plan {
    let Some(current) = current.filter(|c| *c > desired) else {
        return Plan {
            statefulset_replicas: desired,
            drain: Vec::new(),
            drained: Vec::new(),
            progress: None,
        };
    };
    let leaving: Vec<i32> = (desired..current).rev().collect();
    let done = |i: &i32| matches!(reports.get(i), Some(PodDrain::Report(r)) if r.done());
    let all_done = leaving.iter().all(done);
    let parts: Vec<String> = leaving
        .iter()
        .map(|i| match reports.get(i) {
            Some(PodDrain::Report(r)) => format!("{name}-{i} {r}"),
            Some(PodDrain::Unreachable(why)) => format!("{name}-{i} not reachable: {why}"),
            None => format!("{name}-{i} not asked yet"),
        })
        .collect();
    Plan {
        statefulset_replicas: if all_done { desired } else { current },
        drain: if all_done {
            Vec::new()
        } else {
            leaving.clone()
        },
        drained: if all_done { leaving } else { Vec::new() },
        progress: Some(if all_done {
            format!("{current} -> {desired} pods: every leaving pod drained; shrinking")
        } else {
            format!(
                "{current} -> {desired} pods once drained: {}",
                parts.join("; ")
            )
        }),
    }
}

/// Queue volumes no pod of the StatefulSet mounts or will mount again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeftBehind {
    /// Marked drained: delete them.
    pub drained: Vec<i32>,
    /// Not drained (their pod went without draining: the StatefulSet was shrunk by hand,
    /// or while the operator was away): drain them, by a Job each.
    pub undrained: Vec<i32>,
}

/// Which of `volumes` (ordinal → marked drained) are left behind by a StatefulSet of
/// `replicas` pods, of which `pods` (ordinals) still exist: a volume whose pod still
/// exists (terminating, say) is not left behind yet.
pub fn left_behind(volumes: &BTreeMap<i32, bool>, replicas: i32, pods: &[i32]) -> LeftBehind {
    let mut out = LeftBehind::default();
    for (&ordinal, &drained) in volumes.range(replicas..) {
        if pods.contains(&ordinal) {
            continue;
        }
        if drained {
            out.drained.push(ordinal);
        } else {
            out.undrained.push(ordinal);
        }
    }
    out
}

/// Clears, in `volumes` (ordinal → marked drained), the marks of the volumes a pod of a
/// listener asking for `desired` pods mounts or will mount again (ordinal < `desired`),
/// and returns their ordinals: the annotations to remove. A volume marked by a scale-in
/// and taken back by a scale-out before its deletion (its drain cancelled, the pod taking
/// mail again) is no longer drained; left marked, it would be deleted with that mail the
/// next time its pod went without draining.
pub fn stale_marks(volumes: &mut BTreeMap<i32, bool>, desired: i32) -> Vec<i32> {
    let mut stale = Vec::new();
    for (&ordinal, drained) in volumes.range_mut(..desired) {
        if std::mem::take(drained) {
            stale.push(ordinal);
        }
    }
    stale
}

/// The ordinal of `<name>-<n>` (a pod) or `queue-<name>-<n>` (its volume).
pub fn ordinal(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: &str, left: u64, marker: bool) -> PodDrain {
        PodDrain::Report(DrainReport {
            state: state.into(),
            left,
            delivered: 0,
            handed_off: 0,
            marker,
            error: None,
        })
    }

    #[test]
    fn volumes_left_behind() {
        let volumes = BTreeMap::from([(0, false), (1, false), (2, true), (3, false), (4, false)]);
        // Two pods; pod 4 still terminating: volume 2 goes, 3 is drained by a Job, 4 waits
        // for its pod.
        assert_eq!(
            left_behind(&volumes, 2, &[0, 1, 4]),
            LeftBehind {
                drained: vec![2],
                undrained: vec![3],
            }
        );
        // Scaled out again over them: nothing is left behind.
        assert_eq!(left_behind(&volumes, 5, &[0, 1]), LeftBehind::default());
    }

    /// Each reconcile of a listener asking for `desired` pods with a StatefulSet of
    /// `replicas`, of which `pods` exist: the marks it clears, then what it finds left
    /// behind; `volumes` keeps the annotations between reconciles.
    fn reconcile(
        volumes: &mut BTreeMap<i32, bool>,
        desired: i32,
        replicas: i32,
        pods: &[i32],
    ) -> (Vec<i32>, LeftBehind) {
        let cleared = stale_marks(volumes, desired);
        (cleared, left_behind(volumes, replicas, pods))
    }

    #[test]
    fn a_volume_taken_back_loses_its_drained_mark() {
        // 3 -> 1: pods 2 and 1 drained, their volumes marked, the StatefulSet at 1; the
        // pods still terminating.
        let mut volumes = BTreeMap::from([(0, false), (1, true), (2, true)]);
        assert_eq!(
            reconcile(&mut volumes, 1, 1, &[0, 1, 2]),
            (vec![], LeftBehind::default())
        );
        // Back to 3 before the volumes went: pods 1 and 2 take mail on them again.
        assert_eq!(
            reconcile(&mut volumes, 3, 3, &[0, 1, 2]),
            (vec![1, 2], LeftBehind::default())
        );
        assert_eq!(
            volumes,
            BTreeMap::from([(0, false), (1, false), (2, false)])
        );
        // Pod 2 then goes without draining (the StatefulSet shrunk by hand): its volume
        // holds mail again, and is drained by a Job, not deleted.
        assert_eq!(
            reconcile(&mut volumes, 2, 2, &[0, 1]),
            (
                vec![],
                LeftBehind {
                    drained: vec![],
                    undrained: vec![2],
                }
            )
        );
        // Marks of the volumes that stay gone are kept, as are unmarked volumes below.
        let mut volumes = BTreeMap::from([(0, false), (1, false), (2, true), (3, true)]);
        assert_eq!(stale_marks(&mut volumes, 2), Vec::<i32>::new());
        assert_eq!(stale_marks(&mut volumes, 3), vec![2]);
        assert_eq!(
            volumes,
            BTreeMap::from([(0, false), (1, false), (2, false), (3, true)])
        );
    }

    #[test]
    fn shrinks_only_after_every_leaving_pod_drained() {
        // Scale-out and steady state: at once.
        assert_eq!(
            plan("mx", 3, Some(1), &BTreeMap::new()).statefulset_replicas,
            3
        );
        assert_eq!(
            plan("mx", 2, None, &BTreeMap::new()).statefulset_replicas,
            2
        );
        let p = plan("mx", 2, Some(2), &BTreeMap::new());
        assert_eq!((p.statefulset_replicas, p.progress), (2, None));

        // 3 -> 1: pods 2 and 1 drain first, highest first.
        let p = plan("mx", 1, Some(3), &BTreeMap::new());
        assert_eq!(p.statefulset_replicas, 3);
        assert_eq!(p.drain, vec![2, 1]);
        assert!(p.progress.unwrap().contains("mx-2 not asked yet"));

        let mut reports = BTreeMap::from([
            (2, report("drained", 0, true)),
            (1, report("handing_off", 120, false)),
        ]);
        let p = plan("mx", 1, Some(3), &reports);
        assert_eq!(p.statefulset_replicas, 3, "one still drains");
        assert!(p.drained.is_empty());
        assert!(p.progress.unwrap().contains("mx-1 handing_off (120 left"));

        // "drained" without the marker, or with mail left, is not done.
        reports.insert(1, report("drained", 0, false));
        assert_eq!(plan("mx", 1, Some(3), &reports).statefulset_replicas, 3);
        reports.insert(1, report("drained", 3, true));
        assert_eq!(plan("mx", 1, Some(3), &reports).statefulset_replicas, 3);
        reports.insert(1, PodDrain::Unreachable("connection refused".into()));
        assert_eq!(plan("mx", 1, Some(3), &reports).statefulset_replicas, 3);

        reports.insert(1, report("drained", 0, true));
        let p = plan("mx", 1, Some(3), &reports);
        assert_eq!(p.statefulset_replicas, 1);
        assert_eq!(p.drained, vec![2, 1]);
        assert!(p.drain.is_empty());
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal("mx-2", "mx"), Some(2));
        assert_eq!(ordinal("queue-mx-10", "queue-mx"), Some(10));
        assert_eq!(ordinal("mx-dkim", "mx"), None);
        assert_eq!(ordinal("mxa-1", "mx"), None);
    }
}
