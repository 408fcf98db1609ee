//! Binding a plan's launches to device addresses: every [`Arg`] becomes a typed kernel parameter
//! for one micro-batch of `T` tokens. Pure arithmetic over the plan's memory plan, so it is
//! checked on machines without a GPU (`tests/cuda_bind.rs` binds every launch of the real
//! configs against a fake address space and checks types and bounds).

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use vpmoe_codegen::{Arg, CType, Launch, Scratch};
use vpmoe_compiler::plan::{Arena, Buffer, BufferKey};
use vpmoe_compiler::Plan;
use vpmoe_ir::{DType, Graph, ValueDef, ValueId};

/// A contiguous device region and the element type stored there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Region {
    pub addr: u64,
    pub bytes: u64,
    pub dtype: DType,
}

/// One kernel parameter, as the driver passes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Param {
    /// A device pointer and the region it points into (`None` for a null pointer, or one with no
    /// IR dtype such as the optimizer's `double*` partials).
    Ptr(u64, Option<Region>),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl Param {
    /// The parameter's bytes in a 64-bit slot (the driver reads as many as the kernel declares).
    pub fn slot(self) -> u64 {
        match self {
            Param::Ptr(p, _) => p,
            Param::I32(x) => x as u32 as u64,
            Param::I64(x) => x as u64,
            Param::F32(x) => x.to_bits() as u64,
            Param::F64(x) => x.to_bits(),
        }
    }
}

/// Where the buffers of one run of a graph live: the two activation arenas (the graph's memory
/// plan, `buffers`), the model copy of every parameter, the step's gradient sums, the decode
/// program's caches, and the micro-batch shape.
pub struct Layout<'a> {
    pub graph: &'a Graph,
    /// The graph's memory plan, sorted by key ([`Plan::buffers`], [`vpmoe_compiler::plan::Schedule`]).
    pub buffers: &'a [Buffer],
    pub tokens: u64,
    pub seq: u64,
    pub tok_base: u64,
    pub fixed_base: u64,
    /// The model copy of each of the graph's parameters, by parameter id.
    pub params: &'a [Region],
    /// The gradient values the plan sums in place (`Step::grads`), by value id: their step's sum.
    pub sums: &'a BTreeMap<u32, Region>,
    /// An earlier micro-batch of the step is already in the sums: `Arg::Accum` binds 1.
    pub accumulating: bool,
    /// The zeroed `int[TICKETS]` of the split reductions (`Arg::Tickets`).
    pub tickets: u64,
    /// The decode program's key/value caches (`Arg::Cache`, `Arg::BlockTable`).
    pub caches: Option<&'a Caches>,
}

/// The decode program's caches on the device.
pub struct Caches {
    /// Per attention layer, its K and V buffers.
    pub layers: Vec<[Region; 2]>,
    /// The global layers' block table, `int[slots][per_slot]`.
    pub table: Region,
    pub per_slot: u64,
}

/// The model copies of a plan's parameters at `addrs` (plan order), as [`Layout::params`].
pub fn param_regions(plan: &Plan, addrs: &[u64]) -> Vec<Region> {
    plan.params
        .iter()
        .zip(addrs)
        .map(|(e, &addr)| Region { addr, bytes: e.numel * e.ty.dtype.bytes(), dtype: e.ty.dtype })
        .collect()
}

/// A launch ready for the driver.
#[derive(Clone, Debug)]
pub struct Bound {
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: u32,
    pub params: Vec<Param>,
}

impl Layout<'_> {
    /// The region of an IR value: a parameter's model copy, a gradient's sum, or its arena buffer.
    pub fn value(&self, v: ValueId) -> Result<Region> {
        if let Some(r) = self.sums.get(&v.0) {
            return Ok(*r);
        }
        let val = self.graph.value(v);
        if let ValueDef::Param(p) = val.def {
            return self
                .params
                .get(p.0 as usize)
                .copied()
                .ok_or_else(|| anyhow!("parameter {} has no model copy", p.0));
        }
        let b = self.buffer_of(&BufferKey::Value(v.0)).ok_or_else(|| anyhow!("value %{} has no buffer", v.0))?;
        let need = val.ty.numel(self.tokens) * val.ty.dtype.bytes();
        let r = self.arena(b.arena, b.offset, b.size, val.ty.dtype);
        if need > r.bytes {
            bail!("value %{} needs {need} bytes, its buffer has {}", v.0, r.bytes);
        }
        Ok(r)
    }

    fn buffer_of(&self, key: &BufferKey) -> Option<&Buffer> {
        self.buffers.binary_search_by(|b| b.key.cmp(key)).ok().map(|i| &self.buffers[i])
    }

    fn arena(&self, arena: Arena, offset: u64, size: u64, dtype: DType) -> Region {
        match arena {
            Arena::Tok => Region { addr: self.tok_base + offset * self.tokens, bytes: size * self.tokens, dtype },
            Arena::Fixed => Region { addr: self.fixed_base + offset, bytes: size, dtype },
        }
    }

    /// Binds launch `launch` of node `node` (whose scratch buffers are `scratch`).
    pub fn bind(&self, node: usize, launch: &Launch, scratch: &[Scratch]) -> Result<Bound> {
        let fam = launch.kernel.family();
        let name = launch.kernel.name();
        if fam.params.len() != launch.args.len() {
            bail!("{name}: {} arguments for {} parameters", launch.args.len(), fam.params.len());
        }
        let (t, s) = (self.tokens, self.seq);
        let int = |x: i64, what: &str| -> Result<Param> {
            i32::try_from(x).map(Param::I32).map_err(|_| anyhow!("{name}: {what} = {x} does not fit an int"))
        };
        let mut params = Vec::with_capacity(fam.params.len());
        for (arg, (cty, pname)) in launch.args.iter().zip(fam.params) {
            let p = match arg {
                Arg::Value(v) => {
                    let r = self.value(*v)?;
                    Param::Ptr(r.addr, Some(r))
                }
                Arg::ValueAt { v, offset } => {
                    let r = self.value(*v)?;
                    let skip = offset * r.dtype.bytes();
                    if skip >= r.bytes {
                        bail!("{name}: {pname} starts {skip} bytes into the {}-byte value %{}", r.bytes, v.0);
                    }
                    let r = Region { addr: r.addr + skip, bytes: r.bytes - skip, dtype: r.dtype };
                    Param::Ptr(r.addr, Some(r))
                }
                Arg::Scratch { index, offset } => {
                    let sc = scratch.get(*index as usize).ok_or_else(|| anyhow!("{name}: no scratch {index}"))?;
                    let key = BufferKey::Scratch { node: node as u32, index: *index };
                    let b = self.buffer_of(&key).ok_or_else(|| anyhow!("{name}: scratch {index} has no buffer"))?;
                    let r = self.arena(b.arena, b.offset, b.size, sc.dtype);
                    let skip = offset * sc.dtype.bytes();
                    if skip > r.bytes {
                        bail!("{name}: {pname} starts {skip} bytes into a {}-byte scratch", r.bytes);
                    }
                    let r = Region { addr: r.addr + skip, bytes: r.bytes - skip, dtype: sc.dtype };
                    Param::Ptr(r.addr, Some(r))
                }
                Arg::Null => Param::Ptr(0, None),
                Arg::Tokens { mul } => int((mul * t) as i64, pname)?,
                Arg::Seq => int(s as i64, pname)?,
                Arg::Int(x) => int(*x, pname)?,
                Arg::InvRows => Param::F32(s as f32 / t as f32),
                Arg::Float(x) => Param::F32(*x),
                Arg::Accum(v) => Param::I32((self.accumulating && self.sums.contains_key(&v.0)) as i32),
                Arg::Tickets => {
                    let bytes = vpmoe_codegen::consts::TICKETS * 4;
                    Param::Ptr(self.tickets, Some(Region { addr: self.tickets, bytes, dtype: DType::I32 }))
                }
                Arg::Cache { layer, value } => {
                    let c = self.caches.ok_or_else(|| anyhow!("{name}: {pname} needs the decode caches"))?;
                    let r =
                        c.layers.get(*layer as usize).ok_or_else(|| anyhow!("{name}: no cache of layer {layer}"))?;
                    let r = r[*value as usize];
                    Param::Ptr(r.addr, Some(r))
                }
                Arg::BlockTable => {
                    let c = self.caches.ok_or_else(|| anyhow!("{name}: {pname} needs the decode caches"))?;
                    Param::Ptr(c.table.addr, Some(c.table))
                }
                Arg::BlocksPerSlot => {
                    let c = self.caches.ok_or_else(|| anyhow!("{name}: {pname} needs the decode caches"))?;
                    int(c.per_slot as i64, pname)?
                }
            };
            check_type(&name, pname, *cty, &p)?;
            params.push(p);
        }
        let mut grid = [0u32; 3];
        for (g, d) in grid.iter_mut().zip(launch.grid) {
            let n = d.eval(t, s);
            *g = u32::try_from(n).map_err(|_| anyhow!("{name}: grid dimension {n}"))?;
        }
        if grid[0] == 0 || grid[0] > i32::MAX as u32 || grid[1] > 65_535 || grid[2] > 65_535 || launch.block > 1024 {
            bail!("{name}: grid {grid:?} × block {} is outside the device limits", launch.block);
        }
        Ok(Bound { kernel: name, grid, block: launch.block, params })
    }
}

/// The C parameter type must match what is bound: pointers to the right element type, `int`,
/// `long long`, `float` and `double` scalars.
pub(super) fn check_type(kernel: &str, pname: &str, cty: CType, p: &Param) -> Result<()> {
    let ok = match (cty, p) {
        (CType::Int, Param::I32(_))
        | (CType::Float, Param::F32(_))
        | (CType::LongLong, Param::I64(_))
        | (CType::Double, Param::F64(_)) => true,
        (CType::F64Mut, Param::Ptr(_, r)) => r.is_none(),
        (c, Param::Ptr(_, r)) if c.is_pointer() => match (r, c.pointee()) {
            (None, _) | (Some(_), None) => true,
            (Some(r), Some(dt)) => r.dtype == dt,
        },
        _ => false,
    };
    if !ok {
        bail!("{kernel}: parameter {pname} is `{}`, bound to {p:?}", cty.c());
    }
    Ok(())
}
