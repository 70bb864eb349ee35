//! 2-D FFTs on ndarray images with rustfft: rows, then columns, each in parallel.

use ndarray::{Array2, Axis};
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::{FftNum, FftPlanner};

/// In-place 2-D FFT of a `[rows, cols]` complex array, forward or inverse (unnormalised).
pub fn fft2<T: FftNum>(data: &mut Array2<Complex<T>>, inverse: bool) {
    let (h, w) = data.dim();
    if h == 0 || w == 0 {
        return;
    }
    let mut planner = FftPlanner::<T>::new();
    let row_fft = if inverse {
        planner.plan_fft_inverse(w)
    } else {
        planner.plan_fft_forward(w)
    };
    let col_fft = if inverse {
        planner.plan_fft_inverse(h)
    } else {
        planner.plan_fft_forward(h)
    };
    data.axis_iter_mut(Axis(0))
        .into_par_iter()
        .for_each(|mut row| match row.as_slice_mut() {
            Some(s) => row_fft.process(s),
            None => {
                let mut buf: Vec<Complex<T>> = row.iter().copied().collect();
                row_fft.process(&mut buf);
                row.iter_mut().zip(buf).for_each(|(d, s)| *d = s);
            }
        });
    data.axis_iter_mut(Axis(1))
        .into_par_iter()
        .for_each(|mut col| {
            let mut buf: Vec<Complex<T>> = col.iter().copied().collect();
            col_fft.process(&mut buf);
            col.iter_mut().zip(buf).for_each(|(d, s)| *d = s);
        });
}
