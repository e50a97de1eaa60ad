//! `--replicas`, `--constraint`, `--placement-pref`, `--replicas-max-per-node`.

use mesh_planner::{Constraint, MAX_REPLICAS, Spread};

use super::{count, parsed};

pub fn replicas(what: &str, n: i64) -> Result<u32, String> {
    count(what, n, MAX_REPLICAS, "no tasks")
}

/// 0 (or nothing) is no limit.
pub fn per_node(what: &str, n: i64) -> Result<u32, String> {
    count(what, n, MAX_REPLICAS, "no limit")
}

pub fn constraints(what: &str, raw: &[String]) -> Result<Vec<Constraint>, String> {
    raw.iter().map(|c| parsed(what, c)).collect()
}

pub fn preferences(what: &str, raw: &[String]) -> Result<Vec<Spread>, String> {
    raw.iter().map(|p| parsed(what, p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_words_parse_like_dockers_and_bad_ones_name_the_flag() {
        let c = constraints("--constraint", &["node.labels.env==production".into()]).unwrap();
        assert_eq!(c[0].to_string(), "node.labels.env==production");
        let e = constraints("--constraint", &["node.labels.env=production".into()]).unwrap_err();
        assert!(
            e.starts_with("--constraint: ") && e.contains("FIELD==VALUE"),
            "{e}"
        );
        assert!(preferences("--placement-pref", &["spread=node.labels.zone".into()]).is_ok());
        assert!(replicas("--replicas", -1).unwrap_err().contains("from 0"));
        assert!(
            replicas("--replicas", 1_000_000)
                .unwrap_err()
                .contains("more than mesh allows")
        );
    }
}
