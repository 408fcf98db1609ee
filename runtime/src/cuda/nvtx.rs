//! NVTX push/pop ranges and marks, with no libnvToolsExt.
//!
//! CUDA 13 ships no `libnvToolsExt`. NVTX v3 is header-only: each client carries its own
//! copy of the NVTX globals and, on first use, hands them to whatever tool `nsys` / `ncu`
//! injects. This module reimplements that client side of the NVTX3 injection protocol, so
//! `nsys profile` (and `ncu --nvtx`) see one range per executed plan node.
//!
//! What the C header does, and what this module mirrors:
//! 1. On the first NVTX call, read `NVTX_INJECTION64_PATH` (`NVTX_INJECTION32_PATH` on 32-bit).
//!    Unset means no tool: every NVTX call becomes a no-op.
//! 2. `dlopen(path, RTLD_LAZY)` it and look up `InitializeInjectionNvtx2`.
//! 3. Call it with our `nvtxGetExportTable`. The tool asks that for `NVTX_ETID_CALLBACKS` and
//!    through its `GetModuleFunctionTable(module, &table, &size)` gets, for each module, an
//!    array of *pointers to* our function-pointer slots; it writes its implementations into
//!    the slots it supports.
//! 4. A zero return is failure: the library is closed and all calls stay no-ops. A slot the
//!    tool left null is a no-op too.
//!
//! ABI source: NVIDIA/NVTX (tag v3.1.0, unchanged on `dev` as of 2024-10), files under
//! `c/include/nvtx3/`:
//! - `nvtxDetail/nvtxTypes.h`: `NvtxCallbackModule`, `NvtxCallbackIdCore` (and the other
//!   modules' `*_SIZE`), `NvtxExportTableID`, `NvtxExportTableCallbacks`,
//!   `NvtxExportTableVersionInfo`, `NvtxFunctionTable`, the `*_impl_fntype` signatures,
//!   `NvtxInitializeInjectionNvtxFunc_t`.
//! - `nvtxDetail/nvtxImpl.h`: layout of the per-module tables (slot 0 null, one trailing null
//!   guard), `nvtxEtiGetModuleFunctionTable` (reports `SIZE` entries, returns 1 / 0 for an
//!   unknown module), `nvtxGetExportTable`, the initial version-info values.
//! - `nvtxDetail/nvtxInit.h`: `nvtxInitializeInjectionLibrary` (env var, dlopen, symbol name,
//!   "init returned 0 means failure").
//! - `nvtxDetail/nvtxImplCore.h` / `nvtxInitDefs.h`: callers load the slot and skip a null.
//! - `nvToolsExt.h`: `NVTX_VERSION` = 3, `NVTX_API` (`__stdcall` on MSVC, nothing elsewhere).

use std::ffi::{c_char, c_int, c_uint, c_void, OsStr};
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

// ---- constants (nvToolsExt.h, nvtxDetail/nvtxTypes.h) ----

/// `NVTX_VERSION`, reported to the tool in the version-info export table.
const NVTX_VERSION: u32 = 3;

/// `NvtxCallbackModule`.
const NVTX_CB_MODULE_CORE: u32 = 1;
const NVTX_CB_MODULE_CUDA: u32 = 2;
const NVTX_CB_MODULE_OPENCL: u32 = 3;
const NVTX_CB_MODULE_CUDART: u32 = 4;
const NVTX_CB_MODULE_CORE2: u32 = 5;
const NVTX_CB_MODULE_SYNC: u32 = 6;

/// `NvtxCallbackIdCore` slots this module calls.
const NVTX_CBID_CORE_MARK_A: usize = 2;
const NVTX_CBID_CORE_RANGE_PUSH_A: usize = 9;
const NVTX_CBID_CORE_RANGE_POP: usize = 11;

/// `NVTX_CBID_<module>_SIZE`: one past the last callback id of each module.
const NVTX_CBID_CORE_SIZE: usize = 16;
const NVTX_CBID_CUDA_SIZE: usize = 9;
const NVTX_CBID_OPENCL_SIZE: usize = 15;
const NVTX_CBID_CUDART_SIZE: usize = 7;
const NVTX_CBID_CORE2_SIZE: usize = 16;
const NVTX_CBID_SYNC_SIZE: usize = 7;

/// `NvtxExportTableID` (2 is `NVTX_ETID_RESERVED0`).
const NVTX_ETID_CALLBACKS: u32 = 1;
const NVTX_ETID_VERSIONINFO: u32 = 3;

/// nvtxInit.h picks the variable by pointer width.
#[cfg(target_pointer_width = "32")]
const ENV_VAR: &str = "NVTX_INJECTION32_PATH";
#[cfg(not(target_pointer_width = "32"))]
const ENV_VAR: &str = "NVTX_INJECTION64_PATH";

const INIT_SYMBOL: &[u8] = b"InitializeInjectionNvtx2\0";

// ---- C types ----
// `NVTX_API` is `__stdcall` under MSVC and empty elsewhere; `extern "system"` is exactly that.

/// `NvtxFunctionPointer*`: where one function pointer lives.
type FnSlotPtr = *mut *mut c_void;
/// `NvtxFunctionTable` (`NvtxFunctionPointer**`): an array of slot pointers.
type FunctionTable = *mut FnSlotPtr;

/// `NvtxGetExportTableFunc_t`.
type GetExportTableFn = unsafe extern "system" fn(export_table_id: u32) -> *const c_void;
/// `NvtxInitializeInjectionNvtxFunc_t`: nonzero is success.
type InitFn = unsafe extern "system" fn(get_export_table: GetExportTableFn) -> c_int;
/// `GetModuleFunctionTable` in `NvtxExportTableCallbacks` (the module is a C enum: 32 bits).
type GetModuleFunctionTableFn =
    unsafe extern "system" fn(module: u32, out_table: *mut FunctionTable, out_size: *mut c_uint) -> c_int;

/// `nvtxRangePushA_impl_fntype`.
type RangePushAFn = unsafe extern "system" fn(message: *const c_char) -> c_int;
/// `nvtxRangePop_impl_fntype`.
type RangePopFn = unsafe extern "system" fn() -> c_int;
/// `nvtxMarkA_impl_fntype`.
type MarkAFn = unsafe extern "system" fn(message: *const c_char);

/// `NvtxExportTableCallbacks`.
#[repr(C)]
struct ExportTableCallbacks {
    struct_size: usize,
    get_module_function_table: GetModuleFunctionTableFn,
}

/// `NvtxExportTableVersionInfo`.
#[repr(C)]
struct ExportTableVersionInfo {
    struct_size: usize,
    version: u32,
    reserved0: u32,
    set_injection_nvtx_version: unsafe extern "system" fn(version: u32),
}

// ---- the globals the tool writes into ----
//
// `AtomicPtr<T>` has the same in-memory representation as `*mut T`, and holds an `UnsafeCell`, so
// these statics sit in writable memory and may be written by the tool through raw pointers; we
// read them with atomic loads (the C header reads plain globals on every call, so a tool may
// rewrite a slot after init and we still see it).

/// A function-pointer slot (`NvtxFunctionPointer`), null until a tool fills it.
type Slot = AtomicPtr<c_void>;
/// One entry of a module table (`NvtxFunctionPointer*`): the address of a [`Slot`].
type TableEntry = AtomicPtr<Slot>;

/// Slot storage for `N` callback ids; index 0 (`*_INVALID`) is never handed out.
const fn slots<const N: usize>() -> [Slot; N] {
    [const { AtomicPtr::new(ptr::null_mut()) }; N]
}

/// The module table exactly as nvtxImpl.h lays it out: `SIZE + 1` entries, entry 0 null, entries
/// `1..SIZE` pointing at the slots, and a trailing null so a tool reading past the end crashes
/// rather than corrupting memory.
const fn table<const N: usize, const T: usize>(slots: &'static [Slot; N]) -> [TableEntry; T] {
    assert!(T == N + 1);
    let mut t = [const { AtomicPtr::new(ptr::null_mut()) }; T];
    let mut i = 1;
    while i < N {
        t[i] = AtomicPtr::new(ptr::from_ref(&slots[i]).cast_mut());
        i += 1;
    }
    t
}

static CORE_SLOTS: [Slot; NVTX_CBID_CORE_SIZE] = slots();
static CORE_TABLE: [TableEntry; NVTX_CBID_CORE_SIZE + 1] = table(&CORE_SLOTS);
// The other modules are never called from here; they exist so a tool asking for them gets the
// same answer the C header gives (a table, return value 1) instead of a failure.
static CUDA_SLOTS: [Slot; NVTX_CBID_CUDA_SIZE] = slots();
static CUDA_TABLE: [TableEntry; NVTX_CBID_CUDA_SIZE + 1] = table(&CUDA_SLOTS);
static OPENCL_SLOTS: [Slot; NVTX_CBID_OPENCL_SIZE] = slots();
static OPENCL_TABLE: [TableEntry; NVTX_CBID_OPENCL_SIZE + 1] = table(&OPENCL_SLOTS);
static CUDART_SLOTS: [Slot; NVTX_CBID_CUDART_SIZE] = slots();
static CUDART_TABLE: [TableEntry; NVTX_CBID_CUDART_SIZE + 1] = table(&CUDART_SLOTS);
static CORE2_SLOTS: [Slot; NVTX_CBID_CORE2_SIZE] = slots();
static CORE2_TABLE: [TableEntry; NVTX_CBID_CORE2_SIZE + 1] = table(&CORE2_SLOTS);
static SYNC_SLOTS: [Slot; NVTX_CBID_SYNC_SIZE] = slots();
static SYNC_TABLE: [TableEntry; NVTX_CBID_SYNC_SIZE + 1] = table(&SYNC_SLOTS);

static ETBL_CALLBACKS: ExportTableCallbacks =
    ExportTableCallbacks { struct_size: std::mem::size_of::<ExportTableCallbacks>(), get_module_function_table };

static ETBL_VERSION_INFO: ExportTableVersionInfo = ExportTableVersionInfo {
    struct_size: std::mem::size_of::<ExportTableVersionInfo>(),
    version: NVTX_VERSION,
    reserved0: 0,
    set_injection_nvtx_version,
};

// ---- the export-table functions the tool calls ----

/// `nvtxGetExportTable`: the only entry point the tool gets from us.
unsafe extern "system" fn get_export_table(export_table_id: u32) -> *const c_void {
    match export_table_id {
        NVTX_ETID_CALLBACKS => ptr::addr_of!(ETBL_CALLBACKS).cast(),
        NVTX_ETID_VERSIONINFO => ptr::addr_of!(ETBL_VERSION_INFO).cast(),
        _ => ptr::null(),
    }
}

/// `(table, entry count the header reports)`: `sizeof(table) / sizeof(entry) - 1`, i.e. `SIZE`.
fn module_table<const T: usize>(t: &'static [TableEntry; T]) -> (FunctionTable, c_uint) {
    (t.as_ptr().cast::<FnSlotPtr>().cast_mut(), (T - 1) as c_uint)
}

/// `nvtxEtiGetModuleFunctionTable`: 1 with the module's table, 0 for a module we don't know.
unsafe extern "system" fn get_module_function_table(
    module: u32,
    out_table: *mut FunctionTable,
    out_size: *mut c_uint,
) -> c_int {
    let (table, size) = match module {
        NVTX_CB_MODULE_CORE => module_table(&CORE_TABLE),
        NVTX_CB_MODULE_CUDA => module_table(&CUDA_TABLE),
        NVTX_CB_MODULE_OPENCL => module_table(&OPENCL_TABLE),
        NVTX_CB_MODULE_CUDART => module_table(&CUDART_TABLE),
        NVTX_CB_MODULE_CORE2 => module_table(&CORE2_TABLE),
        NVTX_CB_MODULE_SYNC => module_table(&SYNC_TABLE),
        _ => return 0,
    };
    // SAFETY: the tool passes writable out-pointers or null, as in the C header.
    unsafe {
        if !out_size.is_null() {
            *out_size = size;
        }
        if !out_table.is_null() {
            *out_table = table;
        }
    }
    1
}

/// `nvtxEtiSetInjectionNvtxVersion`: reserved; the header ignores it too.
unsafe extern "system" fn set_injection_nvtx_version(_version: u32) {}

// ---- initialisation ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No tool attached: every call is a no-op.
    Off,
    /// A tool's `InitializeInjectionNvtx2` succeeded; calls go through the CORE slots.
    On,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Initialises on first use (like the header's `nvtxInitOnce`); afterwards one atomic load.
#[inline]
fn state() -> State {
    *STATE.get_or_init(|| init_from(std::env::var_os(ENV_VAR).as_deref()))
}

/// `nvtxInitializeInjectionLibrary` for the dynamic-library case. The header's other two
/// sources do not apply here: pre-injected lookup is compiled out on every platform
/// (`NVTX_SUPPORT_ALREADY_INJECTED_LIBRARY 0`), and static injection needs a C weak symbol.
fn init_from(path: Option<&OsStr>) -> State {
    // getenv returning "" would make the header dlopen("") (the main program), which exports no
    // InitializeInjectionNvtx2; treating it as unset gives the same result.
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return State::Off;
    };
    // SAFETY: loading runs the library's initialisers; the path was put there by a profiler
    // exactly so that NVTX clients load it.
    let Ok(lib) = (unsafe { libloading::Library::new(path) }) else {
        return State::Off;
    };
    // SAFETY: the symbol's type is `NvtxInitializeInjectionNvtxFunc_t` (nvtxTypes.h).
    let init: InitFn = match unsafe { lib.get::<InitFn>(INIT_SYMBOL) } {
        Ok(sym) => *sym,
        // The header closes the library when the entry point is missing.
        Err(_) => return State::Off,
    };
    let state = run_init(init);
    if state == State::On {
        // The tool's code now sits behind our slots: never unload it.
        std::mem::forget(lib);
    }
    // On failure `lib` drops here, the header's NVTX_DLLCLOSE.
    state
}

/// Hands our export table to a tool's `InitializeInjectionNvtx2`; zero means failure.
fn run_init(init: InitFn) -> State {
    // SAFETY: `init` is a tool entry point with the NVTX3 signature; everything it can reach
    // through `get_export_table` is 'static.
    if unsafe { init(get_export_table) } != 0 {
        State::On
    } else {
        // The header then forces every pointer to a no-op; `Off` means we never read a slot.
        State::Off
    }
}

// ---- calls ----

/// The tool's function in CORE slot `id`, or `None` if it left it null.
#[inline]
fn core_slot(id: usize) -> Option<*mut c_void> {
    let p = CORE_SLOTS[id].load(Ordering::Acquire);
    (!p.is_null()).then_some(p)
}

/// Calls `f` with `s` as a NUL-terminated C string, without allocating for short names. A name
/// with an interior NUL reaches the tool cut at that NUL, as a C caller's would.
fn with_c_str<R>(s: &str, f: impl FnOnce(*const c_char) -> R) -> R {
    const STACK: usize = 256;
    let b = s.as_bytes();
    if b.len() < STACK {
        let mut buf = [0u8; STACK];
        buf[..b.len()].copy_from_slice(b);
        f(buf.as_ptr().cast())
    } else {
        let mut v = Vec::with_capacity(b.len() + 1);
        v.extend_from_slice(b);
        v.push(0);
        f(v.as_ptr().cast())
    }
}

/// An NVTX push/pop range on the current thread; popped when dropped.
///
/// Not `Send`: NVTX range stacks are per thread, so the pop must happen where the push did.
#[must_use = "the range ends as soon as this guard is dropped"]
pub struct Range {
    pushed: bool,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Range {
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        if let Some(p) = core_slot(NVTX_CBID_CORE_RANGE_POP) {
            // SAFETY: CORE slot RangePop holds an `nvtxRangePop_impl_fntype`.
            let pop = unsafe { std::mem::transmute::<*mut c_void, RangePopFn>(p) };
            // SAFETY: no arguments; the tool's implementation.
            unsafe { pop() };
        }
    }
}

/// Pushes an NVTX range named `name` (`nvtxRangePushA`), popped when the guard drops. A no-op
/// unless a profiler injected an NVTX tool.
#[inline]
pub fn range(name: &str) -> Range {
    range_with(state(), name)
}

fn range_with(state: State, name: &str) -> Range {
    let mut pushed = false;
    if state == State::On {
        if let Some(p) = core_slot(NVTX_CBID_CORE_RANGE_PUSH_A) {
            // SAFETY: CORE slot RangePushA holds an `nvtxRangePushA_impl_fntype`.
            let push = unsafe { std::mem::transmute::<*mut c_void, RangePushAFn>(p) };
            // SAFETY: a valid NUL-terminated string that outlives the call.
            with_c_str(name, |s| unsafe { push(s) });
            pushed = true;
        }
    }
    Range { pushed, _not_send: PhantomData }
}

/// Emits an instantaneous NVTX marker named `name` (`nvtxMarkA`). A no-op unless a profiler
/// injected an NVTX tool.
#[inline]
pub fn mark(name: &str) {
    mark_with(state(), name);
}

fn mark_with(state: State, name: &str) {
    if state != State::On {
        return;
    }
    if let Some(p) = core_slot(NVTX_CBID_CORE_MARK_A) {
        // SAFETY: CORE slot MarkA holds an `nvtxMarkA_impl_fntype`.
        let mark = unsafe { std::mem::transmute::<*mut c_void, MarkAFn>(p) };
        // SAFETY: a valid NUL-terminated string that outlives the call.
        with_c_str(name, |s| unsafe { mark(s) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[test]
    fn public_calls_never_panic() {
        // Whatever the environment says, these must be safe to call (and nest).
        {
            let _outer = range("outer");
            let _inner = range("inner");
            mark("mark");
        }
        if std::env::var_os(ENV_VAR).is_none() {
            assert_eq!(state(), State::Off);
        }
    }

    #[test]
    fn unset_or_empty_env_is_off() {
        assert_eq!(init_from(None), State::Off);
        assert_eq!(init_from(Some(OsStr::new(""))), State::Off);
        let r = range_with(State::Off, "x");
        assert!(!r.pushed);
        mark_with(State::Off, "x");
    }

    // The global state is process-wide and tests share the process, so rather than mutating
    // NVTX_INJECTION64_PATH (safe in edition 2021 but racy across test threads) this feeds the
    // value straight to the init function the env var would reach.
    #[test]
    fn nonexistent_injection_library_is_off() {
        let p = std::env::temp_dir().join("vpmoe-no-such-nvtx-injection-lib.so");
        assert_eq!(init_from(Some(p.as_os_str())), State::Off);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn library_without_entry_point_is_off() {
        assert_eq!(init_from(Some(OsStr::new("libc.so.6"))), State::Off);
    }

    #[test]
    fn table_layout_matches_nvtx_impl_h() {
        assert!(CORE_TABLE[0].load(Ordering::Relaxed).is_null());
        assert!(CORE_TABLE[NVTX_CBID_CORE_SIZE].load(Ordering::Relaxed).is_null());
        for (i, e) in CORE_TABLE.iter().enumerate().take(NVTX_CBID_CORE_SIZE).skip(1) {
            assert_eq!(e.load(Ordering::Relaxed).cast_const(), ptr::from_ref(&CORE_SLOTS[i]));
        }
        let expected = [
            (NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_SIZE),
            (NVTX_CB_MODULE_CUDA, NVTX_CBID_CUDA_SIZE),
            (NVTX_CB_MODULE_OPENCL, NVTX_CBID_OPENCL_SIZE),
            (NVTX_CB_MODULE_CUDART, NVTX_CBID_CUDART_SIZE),
            (NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_SIZE),
            (NVTX_CB_MODULE_SYNC, NVTX_CBID_SYNC_SIZE),
        ];
        for (module, size) in expected {
            let mut t: FunctionTable = ptr::null_mut();
            let mut n: c_uint = 0;
            assert_eq!(unsafe { get_module_function_table(module, &mut t, &mut n) }, 1);
            assert_eq!(n as usize, size);
            assert!(!t.is_null());
            assert!(unsafe { *t }.is_null(), "slot 0 is null");
            assert!(unsafe { *t.add(size) }.is_null(), "trailing guard is null");
        }
        let mut t: FunctionTable = ptr::null_mut();
        let mut n: c_uint = 99;
        assert_eq!(unsafe { get_module_function_table(0, &mut t, &mut n) }, 0);
        assert_eq!(unsafe { get_module_function_table(7, ptr::null_mut(), ptr::null_mut()) }, 0);
        assert!(t.is_null());
        assert_eq!(n, 99);
    }

    #[test]
    fn export_tables() {
        unsafe {
            let cb = get_export_table(NVTX_ETID_CALLBACKS).cast::<ExportTableCallbacks>();
            assert_eq!((*cb).struct_size, std::mem::size_of::<ExportTableCallbacks>());
            let vi = get_export_table(NVTX_ETID_VERSIONINFO).cast::<ExportTableVersionInfo>();
            assert_eq!((*vi).struct_size, std::mem::size_of::<ExportTableVersionInfo>());
            assert_eq!((*vi).version, 3);
            ((*vi).set_injection_nvtx_version)(3);
            assert!(get_export_table(0).is_null());
            assert!(get_export_table(2).is_null());
            assert!(get_export_table(4).is_null());
        }
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(std::mem::size_of::<ExportTableCallbacks>(), 16);
            assert_eq!(std::mem::size_of::<ExportTableVersionInfo>(), 24);
        }
    }

    // A stand-in tool that does what nsys's InitializeInjectionNvtx2 does: walk the export
    // table, take the CORE module table and write its functions through the slot pointers.
    static PUSHES: AtomicUsize = AtomicUsize::new(0);
    static POPS: AtomicUsize = AtomicUsize::new(0);
    static MARKS: AtomicUsize = AtomicUsize::new(0);
    static LAST: Mutex<String> = Mutex::new(String::new());

    fn record(msg: *const c_char) {
        let s = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
        if let Ok(mut l) = LAST.lock() {
            *l = s;
        }
    }
    unsafe extern "system" fn fake_push(msg: *const c_char) -> c_int {
        record(msg);
        PUSHES.fetch_add(1, Ordering::SeqCst) as c_int
    }
    unsafe extern "system" fn fake_pop() -> c_int {
        POPS.fetch_add(1, Ordering::SeqCst) as c_int
    }
    unsafe extern "system" fn fake_mark(msg: *const c_char) {
        record(msg);
        MARKS.fetch_add(1, Ordering::SeqCst);
    }
    unsafe extern "system" fn fake_tool_init(get: GetExportTableFn) -> c_int {
        // No panics in here: unwinding out of an extern fn aborts. Return 0 on any mismatch.
        let vi = get(NVTX_ETID_VERSIONINFO).cast::<ExportTableVersionInfo>();
        if vi.is_null() || (*vi).version != NVTX_VERSION {
            return 0;
        }
        let cb = get(NVTX_ETID_CALLBACKS).cast::<ExportTableCallbacks>();
        if cb.is_null() || (*cb).struct_size < std::mem::size_of::<ExportTableCallbacks>() {
            return 0;
        }
        let mut t: FunctionTable = ptr::null_mut();
        let mut n: c_uint = 0;
        if ((*cb).get_module_function_table)(NVTX_CB_MODULE_CORE, &mut t, &mut n) == 0
            || n as usize != NVTX_CBID_CORE_SIZE
        {
            return 0;
        }
        **t.add(NVTX_CBID_CORE_RANGE_PUSH_A) = fake_push as RangePushAFn as *mut c_void;
        **t.add(NVTX_CBID_CORE_RANGE_POP) = fake_pop as RangePopFn as *mut c_void;
        **t.add(NVTX_CBID_CORE_MARK_A) = fake_mark as MarkAFn as *mut c_void;
        1
    }
    unsafe extern "system" fn failing_tool_init(_get: GetExportTableFn) -> c_int {
        0
    }

    #[test]
    fn protocol_round_trip_with_fake_tool() {
        assert_eq!(run_init(failing_tool_init), State::Off);
        assert_eq!(run_init(fake_tool_init), State::On);
        {
            let _r = range_with(State::On, "node.attn");
            assert_eq!(PUSHES.load(Ordering::SeqCst), 1);
            assert_eq!(POPS.load(Ordering::SeqCst), 0);
            assert_eq!(*LAST.lock().unwrap(), "node.attn");
        }
        assert_eq!(POPS.load(Ordering::SeqCst), 1);
        let long = "n".repeat(1000);
        drop(range_with(State::On, &long));
        assert_eq!(*LAST.lock().unwrap(), long);
        assert_eq!(POPS.load(Ordering::SeqCst), 2);
        mark_with(State::On, "step");
        assert_eq!(MARKS.load(Ordering::SeqCst), 1);
        assert_eq!(*LAST.lock().unwrap(), "step");
        // With the tool attached but the state Off (init failed), nothing is called.
        drop(range_with(State::Off, "ignored"));
        assert_eq!(PUSHES.load(Ordering::SeqCst), 2);
    }
}
