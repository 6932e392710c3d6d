//! Packing token rows for the wire: f32 (exact), bf16, or fp8-e4m3 with one
//! f32 scale per 128 values of a row, as DeepSeek dispatches.

use crate::error::{DataPlaneError, Result};
use bytes::Bytes;
use expertmesh_model::weights::fp8_e4m3_to_f32 as fp8_decode;
use expertmesh_proto::v1::{Dtype, PackedRows};
use std::borrow::Borrow;

/// Values per fp8 scale.
pub const FP8_GROUP: usize = 128;
/// Largest finite float8_e4m3fn value.
const FP8_MAX: f32 = 448.0;

/// f32 rows viewed as their little-endian bytes, so that `Bytes` can own the
/// buffer instead of a copy of it.
struct F32Bytes<T>(T);

impl<T: Borrow<Vec<f32>>> AsRef<[u8]> for F32Bytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.borrow().as_slice())
    }
}

/// Packs `rows` (`n × hidden` f32) as `dtype`. `rows` is taken by value (a
/// `Vec`, or an `Arc` of one) because f32 payloads are not copied: the
/// message owns the rows' own buffer.
pub fn encode<T: Borrow<Vec<f32>> + Send + 'static>(rows: T, hidden: usize, dtype: Dtype) -> PackedRows {
    let owner = rows;
    let rows: &[f32] = owner.borrow();
    let n = rows.len().checked_div(hidden).unwrap_or(0);
    let (data, scales): (Bytes, Vec<u8>) = match dtype {
        Dtype::Bf16 => (rows.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(), vec![]),
        Dtype::Fp8E4m3 => {
            let mut data = Vec::with_capacity(rows.len());
            let mut scales = Vec::new();
            for row in rows.chunks_exact(hidden.max(1)) {
                for g in row.chunks(FP8_GROUP) {
                    let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if amax > 0.0 { amax / FP8_MAX } else { 1.0 };
                    scales.extend_from_slice(&scale.to_le_bytes());
                    data.extend(g.iter().map(|v| fp8_encode(v / scale)));
                }
            }
            (Bytes::from(data), scales)
        }
        // The wire format is little-endian, like every target we build for.
        Dtype::F32 | Dtype::Unspecified => (Bytes::from_owner(F32Bytes(owner)), vec![]),
    };
    PackedRows {
        dtype: if dtype == Dtype::Unspecified { Dtype::F32 } else { dtype } as i32,
        num_rows: n as u32,
        hidden_size: hidden as u32,
        data,
        scales: Bytes::from(scales),
    }
}

/// Unpacks rows to f32, checking every length against the header and the
/// expected width. Never panics on malformed input.
pub fn decode(p: &PackedRows, expected_hidden: usize) -> Result<Vec<f32>> {
    let (n, h) = (p.num_rows as usize, p.hidden_size as usize);
    if h != expected_hidden {
        return Err(DataPlaneError::Invalid(format!("hidden_size {h}, expected {expected_hidden}")));
    }
    let values = n.checked_mul(h).ok_or_else(|| DataPlaneError::Invalid("row count overflows".into()))?;
    let dtype = Dtype::try_from(p.dtype).map_err(|_| DataPlaneError::Invalid(format!("unknown dtype {}", p.dtype)))?;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::Bf16 => 2,
        Dtype::Fp8E4m3 => 1,
        Dtype::Unspecified => return Err(DataPlaneError::Invalid("dtype unspecified".into())),
    };
    let want = values.checked_mul(width).ok_or_else(|| DataPlaneError::Invalid("payload size overflows".into()))?;
    if p.data.len() != want {
        return Err(DataPlaneError::Invalid(format!(
            "payload of {} bytes for {n} rows × {h} {dtype:?} values (expected {want})",
            p.data.len()
        )));
    }
    Ok(match dtype {
        // Copies (the payload need not be 4-byte aligned).
        Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&p.data),
        Dtype::Bf16 => p.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::Fp8E4m3 => {
            let groups = h.div_ceil(FP8_GROUP);
            if p.scales.len() != n * groups * 4 {
                return Err(DataPlaneError::Invalid(format!(
                    "{} scale bytes for {n} rows of {groups} groups (expected {})",
                    p.scales.len(),
                    n * groups * 4
                )));
            }
            let scales: Vec<f32> =
                p.scales.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let mut out = Vec::with_capacity(values);
            for (r, row) in p.data.chunks_exact(h.max(1)).enumerate().take(n) {
                for (i, b) in row.iter().enumerate() {
                    out.push(fp8_decode(*b) * scales[r * groups + i / FP8_GROUP]);
                }
            }
            out
        }
        Dtype::Unspecified => unreachable!("rejected above"),
    })
}

/// The dtype a node answers in: as dispatched, except that FP8 dispatch is
/// combined in BF16 (as DeepSeek does): combined rows are sums of several
/// experts' outputs, and fp8's 3 mantissa bits cost too much accuracy there.
pub fn combine_dtype(dispatch: Dtype) -> Dtype {
    if dispatch == Dtype::Fp8E4m3 { Dtype::Bf16 } else { dispatch }
}

/// Bytes the rows take on the wire.
pub fn wire_bytes(p: &PackedRows) -> usize {
    p.data.len() + p.scales.len()
}

/// 2^e for the small exponents used here, built from bits (exact, no libm call).
#[inline]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Round half to even for 0 ≤ x < 2^22: adding 1.5·2^23 leaves no fraction
/// bits, so the FPU's default rounding does the work (no libm call).
#[inline]
fn rne(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (x + MAGIC) - MAGIC
}

/// f32 → float8_e4m3fn, round to nearest even, saturating at ±448.
fn fp8_encode(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs().min(FP8_MAX);
    // Exponent of the leading bit; below 2^-6 the code is subnormal, in steps of 2^-9.
    let e = if a > 0.0 { ((a.to_bits() >> 23) as i32 - 127).max(-6) } else { -6 };
    let code = if e == -6 && a < pow2(-6) {
        // q = 8 rounds up into the smallest normal, which is code 8 too.
        rne(a * pow2(9)) as u8
    } else {
        let m = rne((a * pow2(-e) - 1.0) * 8.0) as i32;
        let (e, m) = if m == 8 { (e + 1, 0) } else { (e, m) };
        ((((e + 7) as u8) << 3) | m as u8).min(0x7e)
    };
    sign | code
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_within_dtype_precision(rows in 1usize..6, hidden in 1usize..300, seed in 0u32..1000) {
            let vals: Vec<f32> = (0..rows * hidden).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 20000) as f32 / 1000.0 - 10.0).collect();
            prop_assert_eq!(decode(&encode(vals.clone(), hidden, Dtype::F32), hidden).unwrap(), vals.clone());
            for (a, b) in decode(&encode(vals.clone(), hidden, Dtype::Bf16), hidden).unwrap().iter().zip(&vals) {
                prop_assert!((a - b).abs() <= b.abs() / 256.0 + 1e-30);
            }
            let fp8 = decode(&encode(vals.clone(), hidden, Dtype::Fp8E4m3), hidden).unwrap();
            for (r, (got, want)) in fp8.chunks(hidden).zip(vals.chunks(hidden)).enumerate() {
                for (g, (gg, ww)) in got.chunks(FP8_GROUP).zip(want.chunks(FP8_GROUP)).enumerate() {
                    let amax = ww.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (a, b) in gg.iter().zip(ww) {
                        // 3 mantissa bits: half-ulp relative error 1/16, plus the subnormal floor.
                        prop_assert!((a - b).abs() <= b.abs() / 16.0 + amax / FP8_MAX * 2f32.powi(-9) * 1.01, "row {r} group {g}: {a} vs {b}");
                    }
                }
            }
        }

        /// Arbitrary headers and payloads: never a panic; accepted exactly
        /// when every length agrees with the header (then one value per
        /// row and column), refused with an error otherwise.
        #[test]
        fn malformed_rows_are_refused_and_consistent_ones_accepted(
            dtype in 0i32..5,
            n in 0u32..12,
            h in 0u32..300,
            expected in prop_oneof![Just(None), (0usize..300).prop_map(Some)],
            exact in any::<bool>(),
            data in proptest::collection::vec(any::<u8>(), 0..600),
            scales in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let (nn, hh) = (n as usize, h as usize);
            let width = match dtype { 1 => 4, 2 => 2, 3 => 1, _ => 0 };
            let want_scales = if dtype == 3 { nn * hh.div_ceil(FP8_GROUP) * 4 } else { scales.len() };
            // Half the cases get consistent lengths, so acceptance is exercised too.
            let (data, scales) = if exact {
                ((0..nn * hh * width).map(|i| (i % 0x70) as u8).collect::<Vec<u8>>(), vec![0x3f; want_scales])
            } else {
                (data, scales)
            };
            let expected = expected.unwrap_or(hh);
            let consistent = width > 0 && expected == hh && data.len() == nn * hh * width && scales.len() == want_scales;
            let p = PackedRows { dtype, num_rows: n, hidden_size: h, data: data.into(), scales: scales.into() };
            match decode(&p, expected) {
                Ok(v) => {
                    prop_assert!(consistent, "accepted an inconsistent batch: {:?}", p);
                    prop_assert_eq!(v.len(), nn * hh);
                }
                Err(e) => {
                    prop_assert!(!consistent, "refused a consistent batch: {}", e);
                    prop_assert!(matches!(e, DataPlaneError::Invalid(_)));
                }
            }
        }
    }

    #[test]
    fn fp8_encode_matches_the_format() {
        for b in 0u8..=0xff {
            let v = fp8_decode(b);
            if v.is_nan() {
                continue;
            }
            let e = fp8_encode(v);
            assert_eq!(fp8_decode(e), v, "code {b:#x}");
        }
        assert_eq!(fp8_decode(fp8_encode(1000.0)), 448.0);
        let huge = PackedRows {
            dtype: Dtype::F32 as i32,
            num_rows: u32::MAX,
            hidden_size: u32::MAX,
            data: Bytes::new(),
            scales: Bytes::new(),
        };
        assert!(decode(&huge, u32::MAX as usize).is_err());
    }
}
