//! KServe v2 tensor plumbing for text generation: reading the inputs
//! (`text_input`, `stream`, `sampling_parameters`, request parameters) and
//! writing BYTES/INT32 outputs. Decoding never panics on malformed input.

use crate::generation::GenerationError;
use expertmesh_proto::inference::model_infer_request::InferInputTensor;
use expertmesh_proto::inference::model_infer_response::InferOutputTensor;
use expertmesh_proto::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use std::collections::HashMap;

/// BYTES elements: each a 4-byte little-endian length, then the bytes.
pub fn decode_bytes(raw: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(4).ok_or("BYTES element length is cut short")?;
        let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (elem, tail) = tail.split_at_checked(n).ok_or(format!("BYTES element of {n} bytes is cut short"))?;
        out.push(elem.to_vec());
        rest = tail;
    }
    Ok(out)
}

pub fn encode_bytes(elems: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(elems.iter().map(|e| e.len() + 4).sum());
    for e in elems {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

fn invalid(m: impl Into<String>) -> GenerationError {
    GenerationError::bad(m)
}

/// The elements of input `name`, from `raw_input_contents` (aligned with
/// `inputs`) or from `contents`.
fn input<'a>(req: &'a ModelInferRequest, name: &str) -> Option<(usize, &'a InferInputTensor)> {
    req.inputs.iter().enumerate().find(|(_, t)| t.name == name)
}

fn bytes_input(req: &ModelInferRequest, name: &str) -> Result<Option<Vec<u8>>, GenerationError> {
    let Some((i, t)) = input(req, name) else { return Ok(None) };
    if t.datatype != "BYTES" {
        return Err(invalid(format!("input {name} must be BYTES, not {:?}", t.datatype)));
    }
    let elems = match (req.raw_input_contents.get(i), &t.contents) {
        (Some(raw), _) if !req.raw_input_contents.is_empty() => decode_bytes(raw).map_err(invalid)?,
        (_, Some(c)) => c.bytes_contents.iter().map(|b| b.to_vec()).collect(),
        _ => return Err(invalid(format!("input {name} has no data"))),
    };
    match <[Vec<u8>; 1]>::try_from(elems) {
        Ok([e]) => Ok(Some(e)),
        Err(v) => Err(invalid(format!("input {name} must hold exactly one element, not {}", v.len()))),
    }
}

/// The prompt text (`text_input`, BYTES [1]).
pub fn text_input(req: &ModelInferRequest) -> Result<String, GenerationError> {
    let b = bytes_input(req, "text_input")?.ok_or_else(|| invalid("input text_input (BYTES [1]) is required"))?;
    String::from_utf8(b).map_err(|_| invalid("text_input is not UTF-8"))
}

/// `stream` (BOOL [1]); false when absent.
pub fn stream_input(req: &ModelInferRequest) -> Result<bool, GenerationError> {
    let Some((i, t)) = input(req, "stream") else { return Ok(false) };
    if t.datatype != "BOOL" {
        return Err(invalid(format!("input stream must be BOOL, not {:?}", t.datatype)));
    }
    let vals: Vec<bool> = match (req.raw_input_contents.get(i), &t.contents) {
        (Some(raw), _) if !req.raw_input_contents.is_empty() => raw.iter().map(|b| *b != 0).collect(),
        (_, Some(c)) => c.bool_contents.clone(),
        _ => vec![],
    };
    match vals.as_slice() {
        [v] => Ok(*v),
        _ => Err(invalid("input stream must hold exactly one BOOL")),
    }
}

/// `sampling_parameters` (BYTES [1], a JSON object) merged over the
/// request's `parameters`; keys as vLLM's Triton backend uses them.
pub fn sampling(req: &ModelInferRequest) -> Result<serde_json::Map<String, serde_json::Value>, GenerationError> {
    let mut out: serde_json::Map<String, serde_json::Value> =
        req.parameters.iter().filter_map(|(k, v)| Some((k.clone(), param_json(v)?))).collect();
    if let Some(b) = bytes_input(req, "sampling_parameters")? {
        let v: serde_json::Value =
            serde_json::from_slice(&b).map_err(|e| invalid(format!("sampling_parameters is not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| invalid("sampling_parameters must be a JSON object"))?;
        out.extend(obj.clone());
    }
    Ok(out)
}

fn param_json(p: &InferParameter) -> Option<serde_json::Value> {
    Some(match p.parameter_choice.as_ref()? {
        ParameterChoice::BoolParam(b) => serde_json::json!(b),
        ParameterChoice::Int64Param(i) => serde_json::json!(i),
        ParameterChoice::StringParam(s) => serde_json::json!(s),
        ParameterChoice::DoubleParam(d) => serde_json::json!(d),
        ParameterChoice::Uint64Param(u) => serde_json::json!(u),
    })
}

pub fn bool_param(params: &HashMap<String, InferParameter>, key: &str) -> bool {
    matches!(params.get(key).and_then(|p| p.parameter_choice.as_ref()), Some(ParameterChoice::BoolParam(true)))
}

pub fn bool_parameter(v: bool) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(v)) }
}

/// One output tensor and its raw contents.
pub enum Output {
    Bytes(&'static str, Vec<u8>),
    Int32(&'static str, i32),
}

impl Output {
    pub fn name(&self) -> &'static str {
        match self {
            Output::Bytes(n, _) | Output::Int32(n, _) => n,
        }
    }

    pub fn into_tensor(self) -> (InferOutputTensor, Vec<u8>) {
        let (name, datatype, raw) = match self {
            Output::Bytes(n, b) => (n, "BYTES", encode_bytes(&[&b])),
            Output::Int32(n, v) => (n, "INT32", v.to_le_bytes().to_vec()),
        };
        let t =
            InferOutputTensor { name: name.into(), datatype: datatype.into(), shape: vec![1], ..Default::default() };
        (t, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_proto::inference::InferTensorContents;
    use proptest::prelude::*;

    #[test]
    fn bytes_round_trip_and_short_data_is_an_error() {
        let raw = encode_bytes(&[b"hello", b"", "é".as_bytes()]);
        assert_eq!(decode_bytes(&raw).unwrap(), vec![b"hello".to_vec(), vec![], "é".as_bytes().to_vec()]);
        assert!(decode_bytes(&raw[..raw.len() - 1]).is_err());
        assert!(decode_bytes(&[1, 0]).is_err());
        assert!(decode_bytes(&[255, 255, 255, 255, 1]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_bytes(&raw);
        }

        // BYTES elements round-trip; a cut inside the last element is refused.
        #[test]
        fn bytes_elements_round_trip_and_cut_ones_are_refused(
            elems in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..5),
            cut in 1usize..24,
        ) {
            let refs: Vec<&[u8]> = elems.iter().map(Vec::as_slice).collect();
            let raw = encode_bytes(&refs);
            prop_assert_eq!(decode_bytes(&raw).unwrap(), elems.clone());
            if let Some(last) = elems.last() {
                let cut = cut.min(last.len() + 4);
                prop_assert!(decode_bytes(&raw[..raw.len() - cut]).is_err() || cut == last.len() + 4);
            }
        }

        // A well-formed request's text comes back exactly, from either
        // encoding; the wrong datatype or element count is refused.
        #[test]
        fn text_input_round_trips_and_malformed_tensors_are_refused(text in "\\PC{0,40}", raw in any::<bool>(), count in 0usize..3) {
            let t = InferInputTensor { name: "text_input".into(), datatype: "BYTES".into(), shape: vec![1], ..Default::default() };
            let elems = vec![text.as_bytes(); count];
            let req = if raw {
                ModelInferRequest { inputs: vec![t], raw_input_contents: vec![encode_bytes(&elems).into()], ..Default::default() }
            } else {
                let contents = InferTensorContents { bytes_contents: elems.iter().map(|e| e.to_vec().into()).collect(), ..Default::default() };
                ModelInferRequest { inputs: vec![InferInputTensor { contents: Some(contents), ..t }], ..Default::default() }
            };
            match (count, text_input(&req)) {
                (1, Ok(got)) => prop_assert_eq!(got, text.clone()),
                (1, Err(e)) => prop_assert!(false, "refused a valid text_input: {}", e),
                (_, r) => prop_assert!(r.is_err(), "accepted {} elements", count),
            }
            let mut wrong = req.clone();
            wrong.inputs[0].datatype = "INT32".into();
            prop_assert!(text_input(&wrong).is_err());
        }

        #[test]
        fn any_request_is_read_without_panicking(
            names in proptest::collection::vec(prop_oneof![Just("text_input"), Just("stream"), Just("sampling_parameters"), Just("x")], 0..4),
            types in proptest::collection::vec(prop_oneof![Just("BYTES"), Just("BOOL"), Just("INT32")], 4),
            raws in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..5),
        ) {
            let req = ModelInferRequest {
                inputs: names.iter().zip(&types).map(|(n, t)| InferInputTensor { name: n.to_string(), datatype: t.to_string(), ..Default::default() }).collect(),
                raw_input_contents: raws.into_iter().map(Into::into).collect(),
                ..Default::default()
            };
            let _ = text_input(&req);
            let _ = stream_input(&req);
            let _ = sampling(&req);
        }
    }
}
