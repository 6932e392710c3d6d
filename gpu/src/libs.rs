//! Which CUDA libraries this machine has.
//!
//! cudarc opens `libcuda`, `libcublas`, `libnvrtc` and `libnccl` on first
//! use and panics when one is missing, so every entry point checks here
//! first and turns absence into an error that names the library, the file
//! names searched and what to install.

use crate::error::{GpuError, Result};

/// A CUDA library the backend loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lib {
    /// The driver API (`libcuda.so.1`, from the NVIDIA driver).
    Driver,
    Cublas,
    Nvrtc,
    Nccl,
}

impl Lib {
    /// The name cudarc searches for (`lib<name>.so`, `.so.<major>`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Lib::Driver => "cuda",
            Lib::Cublas => "cublas",
            Lib::Nvrtc => "nvrtc",
            Lib::Nccl => "nccl",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Lib::Driver => "install the NVIDIA driver (it provides libcuda.so.1); this machine may have no GPU",
            Lib::Cublas => {
                "install cuBLAS (pip nvidia-cublas-cu12/-cu13, or the CUDA toolkit) and add its lib directory to LD_LIBRARY_PATH"
            }
            Lib::Nvrtc => {
                "install NVRTC (pip nvidia-cuda-nvrtc-cu12, or the CUDA toolkit) and add its lib directory to LD_LIBRARY_PATH"
            }
            Lib::Nccl => {
                "install NCCL (pip nvidia-nccl-cu12/-cu13); its wheels ship only libnccl.so.2, which is never searched: add a libnccl.so -> libnccl.so.2 link in a directory on LD_LIBRARY_PATH"
            }
        }
    }

    /// Whether the library can be opened.
    pub fn present(self) -> bool {
        // SAFETY: these only try to open the shared library (dlopen); they
        // call nothing in it.
        unsafe {
            match self {
                Lib::Driver => cudarc::driver::sys::is_culib_present(),
                Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// Checks that every library in `libs` can be opened.
pub fn require(libs: &[Lib]) -> Result<()> {
    let missing: Vec<Lib> = libs.iter().copied().filter(|l| !l.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|l| {
            let names = cudarc::get_lib_name_candidates(l.name());
            // The Linux names (the list also has Windows-style ones).
            let prefix = format!("lib{}.so", l.name());
            let so: Vec<&String> = names.iter().filter(|n| n.starts_with(&prefix)).collect();
            format!("lib{} not found (searched {so:?}): {}", l.name(), l.hint())
        })
        .collect();
    Err(GpuError::Missing(lines.join("; ")))
}

/// Opens the shared library at `path` and keeps it loaded for the life of
/// the process, so that cudarc's later lookup by file name (`libnvrtc.so.12`)
/// finds it although its directory is not on `LD_LIBRARY_PATH`: the dynamic
/// loader matches already-loaded objects by their soname. Used by tests and
/// tools that find a pip wheel's library by path.
pub fn preload(path: &std::path::Path) -> Result<()> {
    // SAFETY: loading a CUDA library runs only its initialisers.
    let lib =
        unsafe { libloading::Library::new(path) }.map_err(|e| GpuError::Missing(format!("{}: {e}", path.display())))?;
    // Deliberately never unloaded: cudarc holds symbols from it.
    std::mem::forget(lib);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_libraries_are_named_with_a_hint() {
        // No machine of this project's CI has a driver; where one exists the
        // check passes and there is nothing to name.
        match require(&[Lib::Driver]) {
            Ok(()) => assert!(Lib::Driver.present()),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("libcuda") && m.contains("NVIDIA driver"), "{m}");
            }
        }
        if !Lib::Nccl.present() {
            let m = require(&[Lib::Nccl]).unwrap_err().to_string();
            assert!(m.contains("libnccl.so -> libnccl.so.2"), "{m}");
        }
    }
}
