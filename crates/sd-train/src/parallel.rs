//! Data-parallel training: several peers (threads of one process, `--devices N`, or processes
//! on several machines, `--nodes N`) each run the same model on their share of every batch,
//! and the gradients are averaged across them (an all-reduce) before each peer takes the same
//! optimiser step, so their weights stay identical.
//!
//! Threads reduce through Burn's `burn-collective` (its local level). Between processes the
//! reduce is [`crate::node_link`]'s: node 0 listens at `--orchestrator HOST:PORT`, the others
//! connect to it, and node 0 sums their tensors in rank order and sends the mean back.
//! `burn-collective` 0.21's global level (a websocket orchestrator and a tensor service per
//! node) hung on its second all-reduce between two processes here: every transfer of an
//! operation reuses the ids 0 and 1, and its tensor service waits for an exposed tensor on a
//! `Notify::notify_waiters` that a request arriving just before the tensor misses.
//! With both (`--devices D --nodes N`), each node's threads reduce through burn-collective,
//! the first thread takes the node's mean to the other nodes, and hands the result back to its
//! siblings in a second local reduce.
//!
//! Every random draw of a step is made for the whole global batch on every peer and each takes
//! its rows ([`Peer::rows`]), and example `j` of peer `r` is the global batch's example
//! `r · batch + j`: N peers with batch b train exactly as one process with batch N · b
//! (`accelerate`'s per-device `--train_batch_size`), up to the order of the floating-point
//! sums. Burn's own multi-GPU example applies gradients steps late; here the reduce sits
//! between the backward pass and the step.
//!
//! `burn-collective` has no timeouts: a peer that dies leaves the others waiting. Every wait
//! here is bounded ([`ParallelConfig::timeout`]) and turns into an error naming the wait, and
//! a thread whose run fails resets the local collective so that its siblings stop at once.

use std::marker::PhantomData;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register, reset_collective,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::gradients::Gradients;
use crate::node_link::NodeLink;

/// How the peers of a run find each other (not part of the run's identity: only their count
/// is, through [`crate::TrainConfig::devices`] and [`crate::TrainConfig::nodes`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ParallelConfig {
    /// This process's index among the nodes, from 0 (node 0 writes the output).
    pub node_rank: usize,
    /// With several nodes, `host:port` where node 0 listens and the others connect.
    pub orchestrator: Option<String>,
    /// The longest wait for the other peers, seconds (0: the default, 30 minutes).
    pub timeout: u64,
}

impl ParallelConfig {
    /// The bound on every wait for other peers.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(if self.timeout == 0 {
            1800
        } else {
            self.timeout
        })
    }
}

/// How a peer reaches the others.
#[derive(Debug)]
enum Transport {
    /// Alone.
    Single,
    /// A thread of this process, through burn-collective.
    Threads(PeerId),
    /// A process among several, through node 0.
    Nodes(Mutex<NodeLink>),
    /// A thread of one of several processes: the threads reduce through burn-collective, the
    /// first thread of each process (which holds the link) with the other processes through
    /// node 0, and hands the result back to its siblings through burn-collective again.
    Both {
        /// This thread among the process's.
        id: PeerId,
        /// The link to the other nodes, on the first thread alone.
        link: Option<Mutex<NodeLink>>,
    },
}

/// One peer of a data-parallel run, or the only one.
#[derive(Debug)]
pub struct Peer<B: Backend> {
    transport: Transport,
    rank: usize,
    world: usize,
    timeout: Duration,
    _backend: PhantomData<B>,
}

impl<B: Backend> Default for Peer<B> {
    fn default() -> Self {
        Self::single()
    }
}

impl<B: Backend> Peer<B> {
    /// A run of one: no collective, every reduce the identity.
    pub fn single() -> Self {
        Self {
            transport: Transport::Single,
            rank: 0,
            world: 1,
            timeout: Duration::MAX,
            _backend: PhantomData,
        }
    }

    /// Registers local peer `local` of `devices` on this node (of `nodes`), waiting until every
    /// peer of the run has registered.
    pub fn register(
        devices: usize,
        nodes: usize,
        local: usize,
        parallel: &ParallelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let world = devices * nodes;
        let rank = parallel.node_rank * devices + local;
        if world <= 1 {
            return Ok(Self::single());
        }
        let timeout = parallel.timeout();
        if nodes > 1 {
            let Some(address) = &parallel.orchestrator else {
                return Err(TrainError::Config(
                    "--nodes above 1 needs --orchestrator HOST:PORT (where node 0 listens)".into(),
                ));
            };
            if parallel.node_rank >= nodes {
                return Err(TrainError::Config(format!(
                    "--node-rank {} is not below --nodes {nodes}",
                    parallel.node_rank
                )));
            }
            if devices > 1 {
                let id = local_collective::<B>(rank, devices, device, timeout)?;
                let link = match local {
                    0 => Some(Mutex::new(NodeLink::connect(
                        address,
                        parallel.node_rank,
                        nodes,
                        timeout,
                    )?)),
                    _ => None,
                };
                return Ok(Self {
                    transport: Transport::Both { id, link },
                    rank,
                    world,
                    timeout,
                    _backend: PhantomData,
                });
            }
            let link = NodeLink::connect(address, parallel.node_rank, nodes, timeout)?;
            return Ok(Self {
                transport: Transport::Nodes(Mutex::new(link)),
                rank,
                world,
                timeout,
                _backend: PhantomData,
            });
        }
        let id = local_collective::<B>(rank, devices, device, timeout)?;
        Ok(Self {
            transport: Transport::Threads(id),
            rank,
            world,
            timeout,
            _backend: PhantomData,
        })
    }

    /// This peer's index, from 0; peer 0 writes the output.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many peers train together.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this peer writes checkpoints, logs and the final model.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This peer's `batch` rows of a tensor drawn for the whole global batch
    /// (`world · batch` rows).
    pub fn rows<const D: usize>(&self, global: Tensor<B, D>, batch: usize) -> Tensor<B, D> {
        if self.world == 1 {
            global
        } else {
            global.narrow(0, self.rank * batch, batch)
        }
    }

    /// Replaces every gathered gradient with its mean over the peers: one reduce of all of
    /// them laid end to end (the same slots are filled on every peer: the same model and graph).
    pub fn mean_gradients(&self, all: &mut [&mut Gradients<B>]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut flat = Vec::new();
        for grads in all.iter() {
            for slot in grads.slots().iter().flatten() {
                flat.push(slot.clone());
            }
        }
        if flat.is_empty() {
            return Ok(());
        }
        let reduced = self.reduce(Tensor::cat(flat, 0), "averaging the gradients")?;
        let mut offset = 0;
        for grads in all.iter_mut() {
            let slots = grads.take();
            let mut filled = Vec::with_capacity(slots.len());
            for slot in slots {
                filled.push(slot.map(|s| {
                    let n = s.dims()[0];
                    let part = reduced.clone().narrow(0, offset, n);
                    offset += n;
                    part
                }));
            }
            grads.restore(filled);
        }
        Ok(())
    }

    /// The mean over the peers of each of `values` (the step's loss, a stop request).
    pub fn mean(&self, values: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        if self.world == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::<B, 1>::from_data(
            TensorData::new(values.iter().map(|&v| v as f32).collect(), [values.len()]),
            device,
        );
        let reduced = self.reduce(t, "averaging the loss")?;
        Ok(reduced
            .into_data()
            .iter::<f32>()
            .map(|v| v.elem::<f64>())
            .collect())
    }

    fn reduce(&self, t: Tensor<B, 1>, what: &str) -> Result<Tensor<B, 1>> {
        match &self.transport {
            Transport::Single => Ok(t),
            Transport::Threads(id) => {
                let (id, primitive) = (*id, t.into_primitive().tensor());
                let out = wait(self.timeout, what, move || {
                    all_reduce::<B>(id, primitive, ReduceOperation::Mean)
                })?;
                Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
            }
            Transport::Nodes(link) => self.link_mean(link, t, what),
            Transport::Both { id, link } => {
                let id = *id;
                // The process's mean (every node has as many threads: the mean of the nodes'
                // means is the mean over every peer).
                let primitive = t.into_primitive().tensor();
                let local = wait(self.timeout, what, move || {
                    all_reduce::<B>(id, primitive, ReduceOperation::Mean)
                })?;
                let local = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(local));
                // The first thread takes it to the other nodes; the siblings add zeros to what
                // it brings back, so that all of them get the same numbers.
                let share = match link {
                    Some(link) => self.link_mean(link, local, what)?,
                    None => local.zeros_like(),
                };
                let primitive = share.into_primitive().tensor();
                let out = wait(self.timeout, what, move || {
                    all_reduce::<B>(id, primitive, ReduceOperation::Sum)
                })?;
                Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
            }
        }
    }

    /// The mean over the nodes of `t`, through node 0.
    fn link_mean(
        &self,
        link: &Mutex<NodeLink>,
        t: Tensor<B, 1>,
        what: &str,
    ) -> Result<Tensor<B, 1>> {
        let device = t.device();
        let values = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Parallel(format!("{what}: a tensor not in f32 ({e:?})")))?;
        let n = values.len();
        let mean = link
            .lock()
            .map_err(|_| TrainError::Parallel(format!("{what}: the link is poisoned")))?
            .mean(values)
            .map_err(|e| TrainError::Parallel(format!("{what}: {e}")))?;
        Ok(Tensor::from_data(TensorData::new(mean, [n]), &device))
    }

    /// Leaves the collective at the end of a run; after a failure on a thread, resets it so
    /// that the sibling threads waiting on this one stop with an error instead of waiting.
    pub fn finish(&self, failed: bool) {
        if let Transport::Threads(id) | Transport::Both { id, .. } = &self.transport {
            if failed {
                reset_collective::<B>();
            } else {
                // Bounded: a sibling that failed may have left the collective busy.
                let id = *id;
                let _ = wait(Duration::from_secs(10), "leaving", move || {
                    finish_collective::<B>(id)
                });
            }
        }
    }
}

/// Registers thread `rank` (its global rank: unique in the run) with the `devices` threads of
/// this process in burn-collective.
fn local_collective<B: Backend>(
    rank: usize,
    devices: usize,
    device: &B::Device,
    timeout: Duration,
) -> Result<PeerId> {
    let config = CollectiveConfig::default()
        .with_num_devices(devices)
        .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
    let id = PeerId::from(rank);
    let device = device.clone();
    wait(timeout, "registering with the other peers", move || {
        register::<B>(id, device, config)
    })?;
    Ok(id)
}

/// Runs `f` (a blocking collective call) on its own thread and waits at most `timeout` for it.
fn wait<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, burn_collective::CollectiveError> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(TrainError::Parallel(format!(
            "{what}: another peer stopped or failed ({e:?})"
        ))),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(TrainError::Parallel(format!(
            "{what}: no answer from the other peers in {} s (one stopped, or is stuck)",
            timeout.as_secs()
        ))),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(TrainError::Parallel(format!(
            "{what}: the collective failed (a peer's connection was lost)"
        ))),
    }
}
