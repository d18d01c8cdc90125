//! The CUDA device underneath the backend: finding a usable GPU (without touching the driver
//! when its library is missing), compiling the kernels with NVRTC (once per process and
//! architecture, warnings surfaced), kernel launches with typed arguments, and the pinned host
//! arena of the host tier.
//!
//! Every `unsafe` block of the backend's driver use that is not about its own buffers lives
//! here or in `mod.rs`, each with the invariant it relies on.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::sys::{CUdevice_attribute, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, result as drv};
use cudarc::nvrtc::result as nvrtc;

use crate::backend::BackendError;

/// The oldest compute capability served: bf16 conversion (`cvt.rn.bf16.f32`) and bf16
/// `mma.sync` need sm_80 (Ampere).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Marketing name.
    pub name: String,
    /// (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: usize,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Shared memory a block may opt into, in bytes.
    pub max_shared_per_block: usize,
}

pub(crate) fn device_error(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Device(format!("{what}: {e:?}"))
}

/// Whether the driver, NVRTC and cuBLAS libraries can be loaded. Checked before any call into
/// them: cudarc panics when a dynamically loaded library is missing.
pub fn libraries_present() -> Result<(), String> {
    // SAFETY: each probe only tries to dlopen the library by its candidate names.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    let missing: Vec<&str> = [
        (driver, "libcuda (the NVIDIA driver)"),
        (nvrtc, "libnvrtc"),
        (cublas, "libcublas"),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("cannot load {}", missing.join(", ")))
    }
}

/// Whether NVRTC alone can be loaded (all the kernel compile check needs).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Finds GPU 0 and checks it can run the kernels; `Err` says why not, in words for a log line.
pub fn probe() -> Result<(Arc<CudaContext>, DeviceInfo), String> {
    libraries_present()?;
    let count = CudaContext::device_count().map_err(|e| format!("no CUDA device: {e:?}"))?;
    if count < 1 {
        return Err("no CUDA device".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open CUDA device 0: {e:?}"))?;
    let cc = ctx
        .compute_capability()
        .map_err(|e| format!("compute capability: {e:?}"))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(format!(
            "{name} has compute capability {}.{}; the CUDA backend needs {}.{} or later",
            cc.0, cc.1, MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
        ));
    }
    let attr = |a| {
        ctx.attribute(a)
            .map_err(|e| format!("device attribute {a:?}: {e:?}"))
    };
    let info = DeviceInfo {
        name,
        compute_capability: cc,
        multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize,
        total_memory: ctx
            .total_mem()
            .map_err(|e| format!("device memory: {e:?}"))?,
        max_shared_per_block: attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as usize,
    };
    Ok((ctx, info))
}

/// NVRTC's output for one architecture.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The PTX text (for a virtual architecture such as `compute_90`).
    pub ptx: String,
    /// The machine code (for a real architecture such as `sm_90`), which the driver loads
    /// without a JIT step, so a toolkit newer than the driver still works.
    pub cubin: Option<Vec<u8>>,
    /// The compiler's log (warnings); empty when clean.
    pub log: String,
}

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints; only called once the library is known to load.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The CUDA version the driver supports, as (major, minor).
pub fn driver_version() -> Option<(i32, i32)> {
    let mut v = 0;
    // SAFETY: writes one int; only called once the driver is known to load.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some((v / 1000, (v % 1000) / 10))
}

/// Compiles every kernel for `arch` with NVRTC: a virtual architecture (`compute_90`) gives
/// PTX, a real one (`sm_90`) machine code as well. Compile errors carry the log.
pub fn compile(arch: &str) -> Result<Compiled, BackendError> {
    let src = CString::new(hotprefix_kernels::program())
        .map_err(|_| BackendError::Device("kernel source holds a NUL byte".into()))?;
    let name = c"hotprefix_kernels.cu";
    let prog = nvrtc::create_program(&src, Some(name)).map_err(|e| device_error("nvrtc", e))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ];
    // SAFETY: `prog` is a live program created above; the options are valid C strings.
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    // SAFETY: `prog` is live; the log is a NUL-terminated buffer NVRTC filled.
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|raw| {
            // SAFETY: get_program_log returns a NUL-terminated buffer.
            unsafe { CStr::from_ptr(raw.as_ptr()) }
                .to_string_lossy()
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let result = match compiled {
        Ok(()) => {
            // SAFETY: `prog` compiled; get_ptx returns its NUL-terminated PTX (for a real
            // architecture NVRTC may produce none, which is not an error here).
            let ptx = unsafe { nvrtc::get_ptx(prog) }
                .map(|raw| {
                    // SAFETY: as above, the buffer is NUL-terminated.
                    unsafe { CStr::from_ptr(raw.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            let cubin = if arch.starts_with("sm_") {
                // SAFETY: `prog` compiled for a real architecture; the size query and the
                // copy use a buffer of exactly the reported size.
                unsafe { cubin_of(prog) }
            } else {
                None
            };
            Ok(Compiled { ptx, cubin, log })
        }
        Err(e) => Err(BackendError::Device(format!(
            "nvrtc could not compile the kernels for {arch} ({e:?}):\n{log}"
        ))),
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// The machine code of a compiled program, if NVRTC made any.
///
/// # Safety
/// `prog` must be a live program compiled for a real architecture.
unsafe fn cubin_of(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Option<Vec<u8>> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    // SAFETY: the caller guarantees `prog` is live and compiled.
    if unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS
        || size == 0
    {
        return None;
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds exactly `size` bytes, as NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char) };
    (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some(buf)
}

/// [`compile`], cached per process and architecture: every backend of a process (tests start
/// several) shares one compilation.
pub fn compile_cached(arch: &str) -> Result<Arc<Compiled>, BackendError> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Compiled>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(arch)
    {
        return Ok(Arc::clone(c));
    }
    let c = Arc::new(compile(arch)?);
    if !c.log.is_empty() {
        tracing::warn!(arch, log = %c.log, "NVRTC warnings compiling the kernels");
    }
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(arch.to_string(), Arc::clone(&c));
    Ok(c)
}

/// One kernel argument, as the kernel declares it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device pointer.
    Ptr(CUdeviceptr),
    /// `int`.
    I32(i32),
    /// `unsigned int` (`u32` in the kernels).
    U32(u32),
    /// `unsigned long long` (`u64` in the kernels).
    U64(u64),
    /// `float`.
    F32(f32),
}

/// Launches `f` on `stream` with `args`, which must match the kernel's parameter list in
/// order and type (each call site sits next to its kernel's signature).
pub(crate) fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[Arg],
) -> Result<(), BackendError> {
    let mut values: Vec<Arg> = args.to_vec();
    let mut ptrs: Vec<*mut c_void> = values
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        })
        .collect();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| device_error("binding the CUDA context", e))?;
    // SAFETY: `ptrs` points at `values`, alive until the launch returns (the driver copies
    // arguments at launch); their types follow the kernel's declaration at every call site;
    // every pointer argument refers to device memory the backend owns for at least as long as
    // the stream's work on it (buffers are freed stream-ordered).
    unsafe {
        drv::launch_kernel(
            f.cu_function(),
            grid,
            (block, 1, 1),
            smem,
            stream.cu_stream(),
            &mut ptrs,
        )
    }
    .map_err(|e| device_error("kernel launch", e))
}

/// The host tier: one page-locked arena, mapped into the device's address space so kernels
/// read and write it in place, and not write-combined (the host never reads it, but a
/// write-combined arena would make any host read of it, e.g. for debugging, crawl).
#[derive(Debug)]
pub(crate) struct PinnedArena {
    ptr: *mut c_void,
    bytes: usize,
    device_ptr: CUdeviceptr,
    ctx: Arc<CudaContext>,
}

// SAFETY: the arena is plain page-locked memory owned by this value; the host never touches
// its bytes (only the device does, ordered by the backend's streams), so moving the owner
// between threads is sound.
unsafe impl Send for PinnedArena {}

impl PinnedArena {
    /// Allocates `bytes` (not zeroed: every block is written before it is read).
    pub(crate) fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<PinnedArena, BackendError> {
        ctx.bind_to_thread()
            .map_err(|e| device_error("binding the CUDA context", e))?;
        let flags = cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE
            | cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain page-locked allocation; the pointer is owned by the returned value
        // and freed once in Drop.
        let ptr = unsafe { drv::malloc_host(bytes.max(1), flags) }.map_err(|e| {
            BackendError::Alloc(format!("{bytes} bytes of pinned host memory: {e:?}"))
        })?;
        let mut device_ptr: CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with DEVICEMAP just above; the call writes its device
        // address into `device_ptr`.
        let r =
            unsafe { cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr, 0) };
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            // SAFETY: `ptr` came from malloc_host and is not used after this.
            let _ = unsafe { drv::free_host(ptr) };
            return Err(device_error("mapping the pinned host arena", r));
        }
        Ok(PinnedArena {
            ptr,
            bytes,
            device_ptr,
            ctx: Arc::clone(ctx),
        })
    }

    /// The arena's address for kernels.
    pub(crate) fn device_ptr(&self) -> CUdeviceptr {
        self.device_ptr
    }

    /// The arena's host address, for copies the driver performs.
    pub(crate) fn host_ptr(&self) -> *mut c_void {
        self.ptr
    }

    /// Its size.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for PinnedArena {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // Nothing may still copy from or to the arena: the backend synchronises its copy
        // streams before dropping it.
        // SAFETY: `ptr` came from malloc_host and is freed exactly once, here.
        let _ = unsafe { drv::free_host(self.ptr) };
    }
}
