//! Zigzag varints as Kafka's record format uses them (`varint` = zigzag `i32`,
//! `varlong` = zigzag `i64`, both little-endian base-128).

use bytes::BufMut;

/// Longest encoding of a varint (`i32`).
pub const VARINT_BYTES_MAX: usize = 5;
/// Longest encoding of a varlong (`i64`).
pub const VARLONG_BYTES_MAX: usize = 10;

fn zigzag64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag64(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Bytes needed to encode `value` as a varint/varlong.
pub fn encoded_len(value: i64) -> usize {
    let raw = zigzag64(value);
    let bits = 64 - (raw | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `value` zigzag-encoded.
pub fn put(dst: &mut impl BufMut, value: i64) {
    let mut raw = zigzag64(value);
    while raw >= 0x80 {
        dst.put_u8((raw as u8) | 0x80);
        raw >>= 7;
    }
    dst.put_u8(raw as u8);
}

/// Reads a zigzag varlong from `src[*pos..]`, at most `bytes_max` bytes long.
/// Returns `None` when the input ends early or the encoding is too long.
pub fn get(src: &[u8], pos: &mut usize, bytes_max: usize) -> Option<i64> {
    let mut raw: u64 = 0;
    for index in 0..bytes_max {
        let byte = *src.get(*pos + index)?;
        raw |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            *pos += index + 1;
            return Some(unzigzag64(raw));
        }
    }
    None
}

/// Reads a zigzag varint (`i32`).
pub fn get_i32(src: &[u8], pos: &mut usize) -> Option<i32> {
    let value = get(src, pos, VARINT_BYTES_MAX)?;
    i32::try_from(value).ok()
}

/// Reads a zigzag varlong (`i64`).
pub fn get_i64(src: &[u8], pos: &mut usize) -> Option<i64> {
    get(src, pos, VARLONG_BYTES_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_length() {
        for value in [
            0,
            1,
            -1,
            63,
            -64,
            64,
            300,
            i32::MAX as i64,
            i32::MIN as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let mut buf = Vec::new();
            put(&mut buf, value);
            assert_eq!(buf.len(), encoded_len(value), "{value}");
            let mut pos = 0;
            assert_eq!(get_i64(&buf, &mut pos), Some(value));
            assert_eq!(pos, buf.len());
        }
    }

    #[test]
    fn kafka_vectors() {
        // Zigzag: 0 -> 0, -1 -> 1, 1 -> 2, -64 -> 127, 64 -> 128 (two bytes).
        let mut buf = Vec::new();
        put(&mut buf, -1);
        put(&mut buf, 64);
        assert_eq!(buf, [0x01, 0x80, 0x01]);
    }

    #[test]
    fn truncated_and_overlong() {
        let mut pos = 0;
        assert_eq!(get_i32(&[0x80], &mut pos), None);
        assert_eq!(get_i32(&[0xff; 6], &mut pos), None);
        assert_eq!(get_i32(&[0xff, 0xff, 0xff, 0xff, 0x7f], &mut pos), None);
    }
}
