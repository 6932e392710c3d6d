//! Which tensors a safetensors checkpoint holds, from its headers alone:
//! the config cannot say whether the MTP module's weights were kept
//! (transformers declares `num_nextn_predict_layers` but drops layer
//! `num_hidden_layers` when it saves), and every service must agree.

use crate::error::{Result, SpecError};
use serde_json::Value;
use std::path::Path;

/// A safetensors header larger than this is refused (real ones are a few MB).
const MAX_HEADER: u64 = 256 << 20;

/// Whether the checkpoint in `dir` holds tensor `name`: from
/// `model.safetensors.index.json`'s weight map when there is one, else from
/// the header of every `*.safetensors` file.
pub(crate) fn has_tensor(dir: &Path, name: &str) -> Result<bool> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| SpecError::io(&index, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| SpecError::Config(format!("{}: {e}", index.display())))?;
        return Ok(v.get("weight_map").and_then(|m| m.get(name)).is_some());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| SpecError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| SpecError::io(dir, e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") && header(&path)?.get(name).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One file's header: tensor names to their dtype, shape and offsets.
fn header(path: &Path) -> Result<serde_json::Map<String, Value>> {
    use std::io::Read;
    let bad = |why: String| SpecError::Config(format!("{}: {why}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| SpecError::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| SpecError::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(bad(format!("safetensors header of {n} bytes")));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| SpecError::io(path, e))?;
    match serde_json::from_slice(&buf) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("the safetensors header is not a JSON object".into())),
        Err(e) => Err(bad(format!("safetensors header: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, header: &str) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        std::fs::write(dir.join(file), b).unwrap();
    }

    #[test]
    fn names_come_from_headers_or_the_index() {
        let dir = std::env::temp_dir().join(format!("em-tensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "a.safetensors", r#"{"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#);
        assert!(has_tensor(&dir, "x").unwrap());
        assert!(!has_tensor(&dir, "y").unwrap());
        write(&dir, "b.safetensors", "[1]");
        assert!(has_tensor(&dir, "y").is_err(), "a broken header is an error, not absence");
        std::fs::write(dir.join("model.safetensors.index.json"), r#"{"weight_map":{"y":"b.safetensors"}}"#).unwrap();
        assert!(has_tensor(&dir, "y").unwrap());
        assert!(!has_tensor(&dir, "x").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
