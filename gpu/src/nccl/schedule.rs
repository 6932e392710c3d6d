//! Per-peer send/recv schedules for one layer's exchange.
//!
//! Counts travel first (the `Transport` contract fixes every count before
//! any payload), so both sides know every size before the NCCL group is
//! posted: this module turns those counts into the group's operations and
//! buffer offsets. Operations are ordered by peer rank on every rank, and
//! each rank posts all of its sends and receives inside one group, which is
//! what NCCL needs to pair them without deadlock.

/// One operation of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Send `len` elements from `offset` of the send buffer to `peer`.
    Send { peer: usize, offset: usize, len: usize },
    /// Receive `len` elements from `peer` into `offset` of the receive buffer.
    Recv { peer: usize, offset: usize, len: usize },
}

/// The group one rank posts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    pub ops: Vec<Op>,
    /// Elements of the send and receive buffers.
    pub send_len: usize,
    pub recv_len: usize,
}

impl Schedule {
    /// `send[p]` / `recv[p]`: rows to and from rank `p`, each `width`
    /// elements. Peers with nothing either way get no operation (NCCL needs
    /// none, and a zero-length pair would still cost a round).
    pub fn new(send: &[usize], recv: &[usize], width: usize) -> Schedule {
        let mut s = Schedule::default();
        for peer in 0..send.len().max(recv.len()) {
            let (out, inn) = (send.get(peer).copied().unwrap_or(0), recv.get(peer).copied().unwrap_or(0));
            if out > 0 {
                s.ops.push(Op::Send { peer, offset: s.send_len, len: out * width });
                s.send_len += out * width;
            }
            if inn > 0 {
                s.ops.push(Op::Recv { peer, offset: s.recv_len, len: inn * width });
                s.recv_len += inn * width;
            }
        }
        s
    }

    /// The elements received from `peer`: `(offset, len)` in the receive buffer.
    pub fn received_from(&self, peer: usize) -> Option<(usize, usize)> {
        self.ops.iter().find_map(|op| match *op {
            Op::Recv { peer: p, offset, len } if p == peer => Some((offset, len)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn offsets_pack_each_direction_and_skip_idle_peers() {
        let s = Schedule::new(&[2, 0, 1], &[0, 3, 1], 4);
        assert_eq!(
            s.ops,
            vec![
                Op::Send { peer: 0, offset: 0, len: 8 },
                Op::Recv { peer: 1, offset: 0, len: 12 },
                Op::Send { peer: 2, offset: 8, len: 4 },
                Op::Recv { peer: 2, offset: 12, len: 4 },
            ]
        );
        assert_eq!((s.send_len, s.recv_len), (12, 16));
        assert_eq!(s.received_from(2), Some((12, 4)));
        assert_eq!(s.received_from(0), None);
    }

    proptest! {
        /// Over a whole world, every send has exactly one matching receive of
        /// the same length, and buffers are covered without gaps or overlap.
        #[test]
        fn world_schedules_pair_up(world in 1usize..6, counts in proptest::collection::vec(0usize..5, 36)) {
            let c = |from: usize, to: usize| counts[from * 6 + to];
            let scheds: Vec<Schedule> = (0..world)
                .map(|r| Schedule::new(&(0..world).map(|p| c(r, p)).collect::<Vec<_>>(), &(0..world).map(|p| c(p, r)).collect::<Vec<_>>(), 3))
                .collect();
            for (r, s) in scheds.iter().enumerate() {
                let mut sent = 0;
                let mut got = 0;
                for op in &s.ops {
                    match *op {
                        Op::Send { peer, offset, len } => {
                            prop_assert_eq!(offset, sent); sent += len;
                            let matching = scheds[peer].ops.iter().filter(|o| matches!(o, Op::Recv { peer: p, len: l, .. } if *p == r && *l == len)).count();
                            prop_assert_eq!(matching, 1);
                        }
                        Op::Recv { offset, len, .. } => { prop_assert_eq!(offset, got); got += len; }
                    }
                }
                prop_assert_eq!((sent, got), (s.send_len, s.recv_len));
            }
        }
    }
}
