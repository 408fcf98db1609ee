//! cuBLAS for the dense GEMMs that are plain products (`--cublas`): a plan launch of `gemm`,
//! `gemm_nn` or `gemm_tn` whose epilogue is the identity (no bias, activation, residual or f32
//! split operand, one row range, and at most an in-place f32 accumulation) is issued as one
//! `cublasGemmEx` (bf16 operands, f32 accumulation) on the same buffers instead of the generated
//! kernel. That covers the LM head's backward (its two gradient GEMMs per vocabulary chunk, but
//! the last chunk's input gradient, which rounds to bf16 in its epilogue) and the dense input
//! gradients; a weight gradient that also writes its layer's bias gradient, and everything else
//! with a fused epilogue, keeps its generated kernel.
//!
//! cuBLAS is column-major; a row-major `[r, c]` buffer with row stride `ld` is its column-major
//! `[c, r]` transpose with leading dimension `ld`, so each row-major product `Y = A·B` is issued
//! as `Yᵀ = Bᵀ·Aᵀ` (operands swapped, `m` = Y's columns, `n` = Y's rows).

use super::bind::{Bound, Param};
use super::device::{DevBuf, Gpu};
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys;
use vpmoe_codegen::KernelSpec;

/// cuBLAS's workspace, set explicitly so calls can be captured into CUDA graphs (cuBLAS then
/// allocates nothing during capture).
const WORKSPACE: usize = 32 << 20;

/// One column-major `C = A'·B' + β·C` (`A' = Aᵀ` when `ta`), the arguments of `cublasGemmEx`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: u64,
    pub lda: i32,
    pub b: u64,
    pub ldb: i32,
    pub c: u64,
    pub ldc: i32,
    /// C is f32 (else bf16).
    pub c_f32: bool,
    /// 1 adds the product into C (a gradient sum or an f32 accumulator), 0 stores it.
    pub beta: f32,
}

fn ptr(p: &Param) -> Option<u64> {
    match *p {
        Param::Ptr(a, _) => Some(a),
        _ => None,
    }
}

fn int(p: &Param) -> Option<i32> {
    match *p {
        Param::I32(x) => Some(x),
        _ => None,
    }
}

/// The cuBLAS call that computes exactly what the bound launch `b` of kernel `spec` computes, or
/// `None` when the launch is not a plain product (see the module comment). The families'
/// contracts are in gemm.cuh, gemm_nn.cuh and gemm_tn.cuh.
pub fn lower(spec: &KernelSpec, b: &Bound) -> Option<Gemm> {
    let p = &b.params;
    let t = &spec.targs;
    match spec.family.as_str() {
        // Y[M, N] = X[M, KD]·W[N, KD]ᵀ  ⇒  Yᵀ = W·Xᵀ
        "gemm" => {
            let [n, kd, epi, out] = t[..] else { return None };
            if epi != 0 || ptr(&p[2])? != 0 {
                return None;
            }
            Some(Gemm {
                ta: true,
                tb: false,
                m: n as i32,
                n: int(&p[5])?,
                k: kd as i32,
                a: ptr(&p[1])?,
                lda: kd as i32,
                b: ptr(&p[0])?,
                ldb: kd as i32,
                c: ptr(&p[4])?,
                ldc: int(&p[6])?,
                c_f32: out == 1,
                beta: 0.0,
            })
        }
        // Y[M, N] = A[M, KD]·W[KD, N] (+ acc, only in place)  ⇒  Yᵀ = Wᵀ·Aᵀ
        "gemm_nn" => {
            let [n, kd, e, amode, epi, out] = t[..] else { return None };
            let (acc, y) = (ptr(&p[3])?, ptr(&p[5])?);
            if e != 0 || amode != 0 || epi != 0 || (acc != 0 && (acc != y || out != 1)) {
                return None;
            }
            Some(Gemm {
                ta: false,
                tb: false,
                m: n as i32,
                n: int(&p[6])?,
                k: kd as i32,
                a: ptr(&p[2])?,
                lda: n as i32,
                b: ptr(&p[0])?,
                ldb: int(&p[7])?,
                c: y,
                ldc: int(&p[8])?,
                c_f32: out == 1,
                beta: if acc != 0 { 1.0 } else { 0.0 },
            })
        }
        // Y[N, K] (+)= A[M, N]ᵀ·B[M, K]  ⇒  Yᵀ = Bᵀ·A
        "gemm_tn" => {
            let [n, k, e, amode, brelu2, bias] = t[..] else { return None };
            if e != 0 || amode != 0 || brelu2 != 0 || bias != 0 || b.grid[2] != 1 {
                return None;
            }
            Some(Gemm {
                ta: false,
                tb: true,
                m: k as i32,
                n: n as i32,
                k: int(&p[5])?,
                a: ptr(&p[1])?,
                lda: int(&p[7])?,
                b: ptr(&p[0])?,
                ldb: int(&p[6])?,
                c: ptr(&p[4])?,
                ldc: k as i32,
                c_f32: true,
                beta: int(&p[8])? as f32,
            })
        }
        _ => None,
    }
}

/// A cuBLAS handle with its workspace.
pub struct Blas {
    handle: sys::cublasHandle_t,
    _workspace: DevBuf,
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Blas> {
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "--cublas needs the cuBLAS library (libcublas.so.13 or libcublas.so), which is not on the loader path; \
                 put its directory on LD_LIBRARY_PATH (from pip: .../site-packages/nvidia/cu13/lib), or run without --cublas"
            );
        }
        gpu.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        let handle = cudarc::cublas::result::create_handle().map_err(|e| anyhow!("cublasCreate: {e}"))?;
        let blas = Blas { handle, _workspace: DevBuf::new(gpu, WORKSPACE, "cuBLAS's workspace")? };
        unsafe { sys::cublasSetWorkspace_v2(handle, blas._workspace.ptr as *mut _, WORKSPACE) }
            .result()
            .map_err(|e| anyhow!("cublasSetWorkspace: {e}"))?;
        Ok(blas)
    }

    /// Issues `g` on `stream` (set per call: launches move to a side stream while a micro-batch
    /// is captured into a graph).
    pub fn gemm(&self, g: &Gemm, stream: cudarc::driver::sys::CUstream) -> Result<()> {
        use sys::{cublasOperation_t::*, cudaDataType::*};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (alpha, beta) = (1f32, g.beta);
        unsafe {
            sys::cublasSetStream_v2(self.handle, stream as sys::cudaStream_t)
                .result()
                .map_err(|e| anyhow!("cublasSetStream: {e}"))?;
            sys::cublasGemmEx(
                self.handle,
                op(g.ta),
                op(g.tb),
                g.m,
                g.n,
                g.k,
                &alpha as *const f32 as *const _,
                g.a as *const _,
                CUDA_R_16BF,
                g.lda,
                g.b as *const _,
                CUDA_R_16BF,
                g.ldb,
                &beta as *const f32 as *const _,
                g.c as *mut _,
                if g.c_f32 { CUDA_R_32F } else { CUDA_R_16BF },
                g.ldc,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()
            .map_err(|e| anyhow!("cublasGemmEx {g:?}: {e}"))
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = unsafe { cudarc::cublas::result::destroy_handle(self.handle) };
    }
}
