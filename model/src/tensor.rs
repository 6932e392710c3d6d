//! Weight matrices in their storage dtype.
//!
//! Weights stay in the dtype the checkpoint gives (bf16 halves memory traffic,
//! which is what decode is bound by, and FP8 stays as bytes with its block
//! scales, decoded in the kernel); F16 is widened to f32 on load. With
//! `--quantize`, matrices become group-quantized int8/int4 codes
//! (`kernels::quant`) as they are loaded. Activations are f32 at every
//! interface; products with bf16 weights use them as f32 (transformers'
//! float32 numbers) or rounded to bf16, products with quantized weights
//! quantize them to int8.

use crate::kernels::fp8::Fp8Matrix;
use crate::kernels::packed;
use crate::kernels::quant::{QuantFormat, QuantMatrix};

/// Storage of a row-major matrix.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    /// Raw bfloat16 bits.
    Bf16(Vec<u16>),
    /// bf16 in the kernels' packed layout (`kernels::packed`).
    Bf16Packed(Vec<u16>),
    /// Group-quantized codes and scales (`kernels::quant`).
    Quant(QuantMatrix),
    /// FP8 e4m3 bytes and block scales as the checkpoint has them
    /// (`kernels::fp8`).
    Fp8(Fp8Matrix),
}

/// A 2-D row-major weight matrix `[rows, cols]` (`nn.Linear` layout: one row per
/// output feature).
#[derive(Debug, Clone)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Storage,
    /// Multiply with bf16-rounded activations (see [`Precision::Bf16`]);
    /// takes effect once the matrix is [`packed`](Matrix::packed).
    bf16_act: bool,
}

/// How products with bf16 weights treat the activations (`--precision` on
/// every command that runs the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// f32 activations: equals transformers' float32 computation up to
    /// summation order (the default; the golden tests hold it to 2e-4).
    #[default]
    F32,
    /// Activations rounded to bf16 at each bf16 matrix product, which lets
    /// the CPU's bf16 dot-product instructions run at twice the f32 rate.
    /// This is what torch does when a model runs in bfloat16; outputs and
    /// everything else stay f32. Gates are always f32.
    Bf16,
}

/// A borrowed matrix, so kernels run equally on owned weights, slices of a
/// fused tensor or an f32 KV cache.
#[derive(Debug, Clone, Copy)]
pub enum MatView<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    /// bf16 weights in the packed layout, `rows × k` logically.
    Packed {
        w: &'a [u16],
        rows: usize,
        k: usize,
        bf16_act: bool,
    },
    /// Group-quantized weights; activations are quantized to int8 per
    /// product whatever the precision mode.
    Quant(&'a QuantMatrix),
    /// FP8 weights; activations stay f32 whatever the precision mode.
    Fp8(&'a Fp8Matrix),
}

impl Matrix {
    /// Builds a matrix; the caller guarantees `data` holds `rows * cols` values.
    pub(crate) fn new(rows: usize, cols: usize, data: Storage) -> Self {
        debug_assert_eq!(
            match &data {
                Storage::F32(v) => v.len(),
                Storage::Bf16(v) => v.len(),
                Storage::Bf16Packed(v) => v.len() / (2 * packed::pairs(cols)) / packed::BLOCK * packed::BLOCK * cols,
                Storage::Quant(q) => q.rows().next_multiple_of(packed::BLOCK) * q.cols(),
                Storage::Fp8(f) => f.rows().next_multiple_of(packed::BLOCK) * f.cols(),
            },
            rows.next_multiple_of(if matches!(data, Storage::Bf16Packed(_) | Storage::Quant(_) | Storage::Fp8(_)) {
                packed::BLOCK
            } else {
                1
            }) * cols
        );
        Matrix { rows, cols, data, bf16_act: false }
    }

    /// Bytes the weights occupy in memory.
    pub fn size_bytes(&self) -> usize {
        match &self.data {
            Storage::F32(v) => v.len() * 4,
            Storage::Bf16(v) | Storage::Bf16Packed(v) => v.len() * 2,
            Storage::Quant(q) => q.size_bytes(),
            Storage::Fp8(f) => f.size_bytes(),
        }
    }

    pub fn precision(&self) -> Precision {
        if self.bf16_act { Precision::Bf16 } else { Precision::F32 }
    }

    /// Applies a precision mode; only bf16 matrices are affected.
    pub fn set_precision(&mut self, p: Precision) {
        self.bf16_act = p == Precision::Bf16 && matches!(self.data, Storage::Bf16(_) | Storage::Bf16Packed(_));
    }

    /// A copy of rows `r0..r1` with the same dtype and precision.
    pub fn slice_rows(&self, r0: usize, r1: usize) -> Matrix {
        let (a, b) = (r0 * self.cols, r1 * self.cols);
        let data = match &self.data {
            Storage::F32(v) => Storage::F32(v[a..b].to_vec()),
            Storage::Bf16(v) => Storage::Bf16(v[a..b].to_vec()),
            Storage::Bf16Packed(_) | Storage::Quant(_) | Storage::Fp8(_) => Storage::F32(self.to_f32()[a..b].to_vec()),
        };
        Matrix { rows: r1 - r0, cols: self.cols, data, bf16_act: self.bf16_act }
    }

    /// Re-lays bf16 weights out for the packed kernels (other dtypes are
    /// returned as they are). Use for matrices only ever multiplied whole.
    pub fn packed(self) -> Matrix {
        match self.data {
            Storage::Bf16(v) => Matrix { data: Storage::Bf16Packed(packed::pack(&v, self.rows, self.cols)), ..self },
            _ => self,
        }
    }

    /// [`packed`](Matrix::packed), or quantized in `quant` = (format, group)
    /// when given (from f32 or bf16 rows; the source is dropped).
    pub fn prepared(self, quant: Option<(QuantFormat, usize)>) -> Matrix {
        let Some((format, group)) = quant else { return self.packed() };
        let (rows, cols) = (self.rows, self.cols);
        let q = match &self.data {
            Storage::F32(v) => QuantMatrix::quantize(format, rows, cols, group, |r, buf| {
                buf.copy_from_slice(&v[r * cols..(r + 1) * cols])
            }),
            Storage::Bf16(v) => QuantMatrix::quantize(format, rows, cols, group, |r, buf| {
                for (d, &s) in buf.iter_mut().zip(&v[r * cols..(r + 1) * cols]) {
                    *d = bf16_to_f32(s);
                }
            }),
            Storage::Bf16Packed(_) | Storage::Quant(_) | Storage::Fp8(_) => {
                let view = self.view();
                QuantMatrix::quantize(format, rows, cols, group, |r, buf| {
                    for (c, d) in buf.iter_mut().enumerate() {
                        *d = view.get(r * cols + c);
                    }
                })
            }
        };
        Matrix { rows, cols, data: Storage::Quant(q), bf16_act: false }
    }

    /// A bf16 matrix from raw bf16 bits.
    pub fn from_bf16(rows: usize, cols: usize, bits: Vec<u16>) -> Self {
        assert_eq!(bits.len(), rows * cols, "matrix data length");
        Matrix::new(rows, cols, Storage::Bf16(bits))
    }

    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Matrix::new(rows, cols, Storage::F32(data))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn view(&self) -> MatView<'_> {
        match &self.data {
            Storage::F32(v) => MatView::F32(v),
            Storage::Bf16(v) => MatView::Bf16(v),
            Storage::Bf16Packed(v) => MatView::Packed { w: v, rows: self.rows, k: self.cols, bf16_act: self.bf16_act },
            Storage::Quant(q) => MatView::Quant(q),
            Storage::Fp8(f) => MatView::Fp8(f),
        }
    }

    /// The transpose (`cols × rows`) with the same precision: bf16 stays
    /// bf16 (moving bits is exact), other dtypes become f32.
    pub fn transposed(&self) -> Matrix {
        fn t<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
            (0..cols).flat_map(|c| (0..rows).map(move |r| v[r * cols + c])).collect()
        }
        let (rows, cols) = (self.rows, self.cols);
        let data = match &self.data {
            Storage::Bf16(v) => Storage::Bf16(t(v, rows, cols)),
            _ => Storage::F32(t(&self.to_f32(), rows, cols)),
        };
        Matrix { rows: cols, cols: rows, data, bf16_act: self.bf16_act }
    }

    /// The whole matrix widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Storage::F32(v) => v.clone(),
            Storage::Bf16(v) => v.iter().map(|&b| bf16_to_f32(b)).collect(),
            Storage::Bf16Packed(_) | Storage::Quant(_) | Storage::Fp8(_) => {
                let view = self.view();
                (0..self.rows * self.cols).map(|i| view.get(i)).collect()
            }
        }
    }
}

impl MatView<'_> {
    pub fn len(&self) -> usize {
        match self {
            MatView::F32(v) => v.len(),
            MatView::Bf16(v) => v.len(),
            MatView::Packed { rows, k, .. } => rows * k,
            MatView::Quant(q) => q.rows() * q.cols(),
            MatView::Fp8(f) => f.rows() * f.cols(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            MatView::F32(v) => v[i],
            MatView::Bf16(v) => bf16_to_f32(v[i]),
            MatView::Packed { w, k, .. } => bf16_to_f32(w[packed::index(i / k, i % k, packed::pairs(*k))]),
            MatView::Quant(q) => q.get(i / q.cols(), i % q.cols()),
            MatView::Fp8(f) => f.get(i / f.cols(), i % f.cols()),
        }
    }
}

#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even f32 → bf16, as torch does.
#[inline]
pub fn f32_to_bf16(f: f32) -> u16 {
    half::bf16::from_f32(f).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposing_keeps_bf16_bits_and_the_precision() {
        let bits: Vec<u16> = (0..6).map(|i| f32_to_bf16(i as f32 * 1.5 - 2.0)).collect();
        let mut m = Matrix::from_bf16(2, 3, bits.clone());
        m.set_precision(Precision::Bf16);
        let t = m.transposed();
        assert_eq!((t.rows(), t.cols(), t.precision()), (3, 2, Precision::Bf16));
        assert!(
            matches!(&t.data, Storage::Bf16(v) if *v == vec![bits[0], bits[3], bits[1], bits[4], bits[2], bits[5]])
        );
        let f = Matrix::from_f32(2, 3, (0..6).map(|i| i as f32).collect()).transposed();
        assert_eq!(f.to_f32(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(f.transposed().to_f32(), (0..6).map(|i| i as f32).collect::<Vec<_>>());
    }
}
