//! The all-reduce between the processes of a multi-node run (`--nodes N`), over TCP: node 0
//! listens at the orchestrator address and each other node connects to it once. For each
//! reduce every node sends its values; node 0 adds them in rank order (the same sum whatever
//! the arrival order), divides by the node count and sends the mean back to each, so every
//! node steps with the same numbers. A node that dies closes its connection: the others see
//! the reset or end of stream at their next reduce and stop with an error naming it; every
//! read and write is bounded by the run's timeout.
//!
//! Messages are little-endian: a hello of `[magic u32, rank u32, nodes u32]` each way, then per
//! reduce a `u64` count followed by that many `f32`s.

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Result, TrainError};

/// "sdDP": the first word of every hello.
const MAGIC: u32 = 0x7364_4450;

/// A node's connections: node 0 holds one per other node (by rank), the others one to node 0.
#[derive(Debug)]
pub(crate) struct NodeLink {
    rank: usize,
    peers: Vec<(usize, TcpStream)>,
}

fn lost(rank: usize, e: std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
            format!("node {rank} stopped (its connection closed)")
        }
        WouldBlock | TimedOut => format!("node {rank} did not answer within the timeout"),
        Other => format!("node {rank}: {e}"),
        _ => format!("node {rank} cannot be reached ({e})"),
    }
}

impl NodeLink {
    /// Joins the run: node 0 binds `address` and waits for the `nodes - 1` others; the others
    /// connect to it (retrying until `timeout`, since node 0 may start later).
    pub(crate) fn connect(
        address: &str,
        rank: usize,
        nodes: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let bad = |e: String| TrainError::Parallel(format!("--orchestrator {address}: {e}"));
        let deadline = Instant::now() + timeout;
        let hello = |stream: &mut TcpStream, rank: usize| -> std::io::Result<()> {
            let mut msg = Vec::with_capacity(12);
            for word in [MAGIC, rank as u32, nodes as u32] {
                msg.extend_from_slice(&word.to_le_bytes());
            }
            stream.write_all(&msg)
        };
        let read_hello = |stream: &mut TcpStream| -> std::io::Result<[u32; 3]> {
            let mut buf = [0u8; 12];
            stream.read_exact(&mut buf)?;
            let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
            Ok([word(0), word(4), word(8)])
        };
        if rank == 0 {
            let listener = TcpListener::bind(address).map_err(|e| bad(e.to_string()))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| bad(e.to_string()))?;
            let mut peers: Vec<(usize, TcpStream)> = Vec::new();
            while peers.len() + 1 < nodes {
                let mut stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(bad(format!(
                                "{} of {} nodes joined in {} s",
                                peers.len() + 1,
                                nodes,
                                timeout.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(e) => return Err(bad(e.to_string())),
                };
                configure(&mut stream, timeout).map_err(|e| bad(e.to_string()))?;
                let [magic, their_rank, their_nodes] =
                    read_hello(&mut stream).map_err(|e| bad(e.to_string()))?;
                let their_rank = their_rank as usize;
                if magic != MAGIC {
                    return Err(bad("a connection that is not an `sd train` node".into()));
                }
                if their_nodes as usize != nodes {
                    return Err(bad(format!(
                        "node {their_rank} was started with --nodes {their_nodes}, this one with \
                         {nodes}"
                    )));
                }
                if their_rank == 0
                    || their_rank >= nodes
                    || peers.iter().any(|(r, _)| *r == their_rank)
                {
                    return Err(bad(format!(
                        "two nodes with --node-rank {their_rank}, or one out of range"
                    )));
                }
                hello(&mut stream, 0).map_err(|e| bad(e.to_string()))?;
                peers.push((their_rank, stream));
            }
            peers.sort_by_key(|(r, _)| *r);
            Ok(Self { rank, peers })
        } else {
            let addresses: Vec<_> = address
                .to_socket_addrs()
                .map_err(|e| bad(e.to_string()))?
                .collect();
            let mut stream = loop {
                match addresses
                    .iter()
                    .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(5)).ok())
                {
                    Some(stream) => break stream,
                    None if Instant::now() > deadline => {
                        return Err(bad(format!(
                            "node 0 did not answer in {} s",
                            timeout.as_secs()
                        )));
                    }
                    None => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            configure(&mut stream, timeout).map_err(|e| bad(e.to_string()))?;
            hello(&mut stream, rank).map_err(|e| bad(e.to_string()))?;
            let [magic, zero, their_nodes] = read_hello(&mut stream).map_err(|e| {
                bad(format!(
                    "node 0 refused this node (another with --node-rank {rank}?): {e}"
                ))
            })?;
            if magic != MAGIC || zero != 0 || their_nodes as usize != nodes {
                return Err(bad("the answer is not node 0 of this run".into()));
            }
            Ok(Self {
                rank,
                peers: vec![(0, stream)],
            })
        }
    }

    /// The mean of `values` over the nodes (every node passes as many).
    pub(crate) fn mean(&mut self, values: Vec<f32>) -> std::result::Result<Vec<f32>, String> {
        let n = values.len();
        if self.rank != 0 {
            let (_, stream) = &mut self.peers[0];
            send(stream, &values).map_err(|e| lost(0, e))?;
            return receive(stream, n).map_err(|e| lost(0, e));
        }
        let mut sum = values;
        for (rank, stream) in &mut self.peers {
            let theirs = receive(stream, n).map_err(|e| lost(*rank, e))?;
            for (s, t) in sum.iter_mut().zip(theirs) {
                *s += t;
            }
        }
        let nodes = (self.peers.len() + 1) as f32;
        for s in &mut sum {
            *s /= nodes;
        }
        for (rank, stream) in &mut self.peers {
            send(stream, &sum).map_err(|e| lost(*rank, e))?;
        }
        Ok(sum)
    }
}

fn configure(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

fn send(stream: &mut TcpStream, values: &[f32]) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, stream);
    out.write_all(&(values.len() as u64).to_le_bytes())?;
    for v in values {
        out.write_all(&v.to_le_bytes())?;
    }
    out.flush()
}

fn receive(stream: &mut TcpStream, n: usize) -> std::io::Result<Vec<f32>> {
    let mut word = [0u8; 8];
    stream.read_exact(&mut word)?;
    let count = u64::from_le_bytes(word) as usize;
    if count != n {
        return Err(std::io::Error::other(format!(
            "sent {count} values where {n} were expected (different settings?)"
        )));
    }
    let mut bytes = vec![0u8; n * 4];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
