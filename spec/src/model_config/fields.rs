//! Typed reads of `config.json` fields, with errors that name the field.

use crate::error::{Result, SpecError};
use serde_json::{Map, Value};

/// Typed access to a JSON object that names the missing or mistyped field.
pub(super) struct Fields<'a>(pub(super) &'a Map<String, Value>);

impl Fields<'_> {
    pub(super) fn opt(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    pub(super) fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| SpecError::Config(format!("missing field `{k}`")))
    }
    pub(super) fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| SpecError::Config(format!("field `{k}` must be a non-negative integer, got {v}"))),
        }
    }
    /// The first of several spellings that is present (transformers'
    /// `attribute_map` aliases, e.g. `num_experts` / `num_local_experts`).
    pub(super) fn usize_alias(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        Err(SpecError::Config(format!("missing field `{}`", keys.join("` or `"))))
    }
    pub(super) fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        Ok(self.opt_usize(k)?.unwrap_or(d))
    }
    pub(super) fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| SpecError::Config(format!("field `{k}` must be a number, got {v}")))
            }
        }
    }
    pub(super) fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        Ok(self.opt_f64(k)?.unwrap_or(d))
    }
    pub(super) fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.opt(k) {
            None => Ok(d),
            Some(v) => v.as_bool().ok_or_else(|| SpecError::Config(format!("field `{k}` must be a boolean, got {v}"))),
        }
    }
    pub(super) fn opt_str(&self, k: &str) -> Result<Option<&str>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => {
                v.as_str().map(Some).ok_or_else(|| SpecError::Config(format!("field `{k}` must be a string, got {v}")))
            }
        }
    }
    pub(super) fn token_ids(&self, k: &str) -> Result<Vec<u32>> {
        match self.opt(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| SpecError::Config(format!("field `{k}` must hold token ids, got {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| SpecError::Config(format!("field `{k}` must be a token id, got {v}"))),
        }
    }
}
