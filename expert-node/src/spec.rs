//! `--experts` specs: which routed experts a node loads.
//!
//! `all`, or comma-separated `LAYER:EXPERTS` items where LAYER is a decoder
//! layer index or `*` (every MoE layer) and EXPERTS is `*`, `E` or `A-B`
//! (inclusive). Example: `*:0-7,3:12`.

use expertmesh_model::config::ModelConfig;
use std::collections::BTreeSet;

pub fn parse(spec: &str, cfg: &ModelConfig) -> Result<BTreeSet<(usize, usize)>, String> {
    let moe: Vec<usize> = cfg.moe_layers().collect();
    let n = cfg.moe.n_routed_experts;
    let mut out = BTreeSet::new();
    if spec.trim() == "all" {
        for &l in &moe {
            out.extend((0..n).map(|e| (l, e)));
        }
        return Ok(out);
    }
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (l, e) = item.split_once(':').ok_or_else(|| format!("{item:?}: expected LAYER:EXPERTS"))?;
        let layers: Vec<usize> = if l == "*" {
            moe.clone()
        } else {
            let l: usize = l.parse().map_err(|_| format!("{item:?}: bad layer {l:?}"))?;
            if !moe.contains(&l) {
                return Err(format!("{item:?}: layer {l} is not a MoE layer (MoE layers: {moe:?})"));
            }
            vec![l]
        };
        let (a, b) = if e == "*" {
            (0, n.saturating_sub(1))
        } else if let Some((a, b)) = e.split_once('-') {
            let a = a.parse().map_err(|_| format!("{item:?}: bad expert {a:?}"))?;
            (a, b.parse().map_err(|_| format!("{item:?}: bad expert {b:?}"))?)
        } else {
            let x = e.parse().map_err(|_| format!("{item:?}: bad expert {e:?}"))?;
            (x, x)
        };
        if a > b || b >= n {
            return Err(format!("{item:?}: experts must be within 0-{}", n - 1));
        }
        for l in layers {
            out.extend((a..=b).map(|x| (l, x)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"mixtral","vocab_size":10,"hidden_size":8,"num_hidden_layers":2,
            "num_attention_heads":2,"num_local_experts":5,"num_experts_per_tok":2,"intermediate_size":4}"#,
        )
        .unwrap();
        assert_eq!(parse("all", &cfg).unwrap().len(), 10);
        assert_eq!(
            parse("*:0-1, 1:4", &cfg).unwrap().into_iter().collect::<Vec<_>>(),
            vec![(0, 0), (0, 1), (1, 0), (1, 1), (1, 4)]
        );
        for bad in ["x", "2:0", "0:5", "0:3-1", "*:a"] {
            assert!(parse(bad, &cfg).is_err(), "{bad}");
        }
    }
}
