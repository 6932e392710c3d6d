//! Checkpoint-format tests: sharded files, F16 storage, and non-finite
//! weights. Each rewrites a golden fixture and compares with the original.

use expertmesh_model::model::{Logits, Model, SeqChunk};
use expertmesh_model::tensor::Precision;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(case)
}

/// A scratch copy of a fixture's config files, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new(case: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("em-load-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "generation_config.json"] {
            std::fs::copy(fixture(case).join(f), dir.join(f)).unwrap();
        }
        Scratch(dir)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read(case: &str) -> Tensors {
    let bytes = std::fs::read(fixture(case).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn write(path: &Path, t: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> =
        t.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn logits(dir: &Path) -> expertmesh_model::Result<Vec<f32>> {
    let m = Model::load(dir, Precision::F32, &mut |_, _| {})?;
    let mut c = m.new_cache();
    Ok(m.forward(&mut [SeqChunk { tokens: &[3, 14, 15, 92, 65], cache: &mut c }], Logits::All)?.remove(0))
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let s = Scratch::new("qwen3_moe", "shard");
    let all = read("qwen3_moe");
    let (mut a, mut b) = (Tensors::new(), Tensors::new());
    let mut map = serde_json::Map::new();
    for (i, (n, t)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(n.clone(), file.into());
        if i % 2 == 0 {
            a.insert(n, t)
        } else {
            b.insert(n, t)
        };
    }
    write(&s.0.join("model-00001-of-00002.safetensors"), &a);
    write(&s.0.join("model-00002-of-00002.safetensors"), &b);
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(s.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(&s.0).unwrap(), logits(&fixture("qwen3_moe")).unwrap());
}

#[test]
fn f16_weights_are_widened_exactly() {
    let s = Scratch::new("mixtral", "f16");
    let mut t = read("mixtral");
    // Round every tensor to f16 once; the reference is the same values in f32.
    let mut t32 = t.clone();
    for ((d, _, b), (d32, _, b32)) in t.values_mut().zip(t32.values_mut()) {
        assert_eq!(*d, Dtype::F32);
        let vals: Vec<half::f16> =
            b.chunks_exact(4).map(|c| half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
        *b = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        *d = Dtype::F16;
        *b32 = vals.iter().flat_map(|v| v.to_f32().to_le_bytes()).collect();
        *d32 = Dtype::F32;
    }
    write(&s.0.join("model.safetensors"), &t);
    let f16 = logits(&s.0).unwrap();
    write(&s.0.join("model.safetensors"), &t32);
    assert_eq!(f16, logits(&s.0).unwrap());
}

#[test]
fn tied_embeddings_serve_as_lm_head() {
    let s = Scratch::new("mixtral", "tied");
    let mut t = read("mixtral");
    let embed = t["model.embed_tokens.weight"].clone();
    t.insert("lm_head.weight".into(), embed);
    write(&s.0.join("model.safetensors"), &t);
    let untied = logits(&s.0).unwrap();
    t.remove("lm_head.weight");
    write(&s.0.join("model.safetensors"), &t);
    let cfg = std::fs::read_to_string(s.0.join("config.json")).unwrap();
    let cfg = cfg.replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
    std::fs::write(s.0.join("config.json"), cfg).unwrap();
    assert_eq!(logits(&s.0).unwrap(), untied);
}

#[test]
fn nan_weights_are_reported_not_returned() {
    let s = Scratch::new("mixtral", "nan");
    let mut t = read("mixtral");
    let (_, _, b) = t.get_mut("model.norm.weight").unwrap();
    b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write(&s.0.join("model.safetensors"), &t);
    let e = logits(&s.0).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}
