//! Partition choice: keyed records use Kafka's murmur2 so that a key lands on the
//! same partition number as with Kafka's default partitioner; records without a
//! key go round-robin or, by default, stick to one partition for
//! `ProducerConfig::sticky_bytes` and then move to the partition with the least
//! waiting to be sent (Kafka's uniform sticky partitioner, KIP-794).

/// What the producer does with records that have no key and no partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NullKeyPolicy {
    /// Send `sticky_bytes` to one partition, then move to the one with the
    /// fewest bytes waiting (in turn when they are even): fewer, larger batches
    /// than round-robin and an even spread (Kafka's default since 3.3, KIP-794).
    #[default]
    Sticky,
    /// Each record goes to the next partition in turn.
    RoundRobin,
}

/// Kafka's `Utils.murmur2` (MurmurHash2, 32-bit, seed `0x9747b28c`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut hash = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        word = word.wrapping_mul(M);
        word ^= word >> R;
        word = word.wrapping_mul(M);
        hash = hash.wrapping_mul(M);
        hash ^= word;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        hash ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        hash ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        hash ^= u32::from(tail[0]);
        hash = hash.wrapping_mul(M);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash as i32
}

/// The partition Kafka's default partitioner picks for `key`:
/// `(murmur2(key) & 0x7fffffff) % partition_count`.
pub fn partition_for_key(key: &[u8], partition_count: u32) -> u32 {
    debug_assert!(partition_count > 0);
    ((murmur2(key) & 0x7fff_ffff) as u32) % partition_count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_murmur2_vectors() {
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn partition_is_in_range_and_stable() {
        for key in ["a", "b", "some-key", ""] {
            let partition = partition_for_key(key.as_bytes(), 7);
            assert!(partition < 7);
            assert_eq!(partition, partition_for_key(key.as_bytes(), 7));
        }
        assert_eq!(partition_for_key(b"foobar", 1), 0);
    }
}
