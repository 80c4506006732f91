//! Batch compression: the codecs a batch header's attribute bits 0-2 name, and the
//! one piece of logic both ends must agree on byte for byte.
//!
//! A compressed batch keeps its 80-byte header as is (record count, offsets and
//! timestamps stay readable without decompressing); the bytes after it are the
//! codec's block format of the varint-framed records, and the header's
//! `records_bytes` field (offset 44) holds their uncompressed length. The payload
//! CRC covers the compressed bytes, so a broker stores and serves the batch as it
//! came. The numbers follow Kafka's (`1` is gzip there and undefined here):
//!
//! | bits | codec  | block format                                  |
//! |------|--------|-----------------------------------------------|
//! | 0    | none   | the records                                   |
//! | 2    | snappy | raw snappy (its own length preamble included) |
//! | 3    | lz4    | one LZ4 block, no frame and no length prefix  |
//! | 4    | zstd   | one zstd frame                                |
//!
//! Decompression never allocates more than the `records_bytes` the header
//! declares (checked against [`RECORDS_BYTES_MAX`] first) and fails unless the
//! block decodes to exactly that many bytes.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use crate::batch;

/// Largest uncompressed records section a compressed batch may declare.
pub const RECORDS_BYTES_MAX: usize = crate::BATCH_BYTES_MAX - batch::HEADER_BYTES;

/// zstd level used when compressing (Kafka's default).
pub const ZSTD_LEVEL: i32 = 3;

/// A batch compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// Raw snappy.
    Snappy,
    /// One LZ4 block.
    Lz4,
    /// One zstd frame.
    Zstd,
}

/// Why a compressed records section cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl Compression {
    /// Every codec, `None` first.
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The codec named by a header's attributes, or `None` for an undefined one.
    pub fn from_attributes(attributes: u16) -> Option<Compression> {
        match attributes & batch::ATTRIBUTE_COMPRESSION_MASK {
            0 => Some(Compression::None),
            2 => Some(Compression::Snappy),
            3 => Some(Compression::Lz4),
            4 => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The attribute bits of this codec.
    pub fn attribute_bits(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The name used by the CLI and topic configuration.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Appends the compressed form of `records` to `out`.
    pub fn compress_into(self, records: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        match self {
            Compression::None => {
                out.extend_from_slice(records);
                return Ok(());
            }
            Compression::Snappy => {
                out.resize(start + snap::raw::max_compress_len(records.len()), 0);
                let written = snap::raw::Encoder::new()
                    .compress(records, &mut out[start..])
                    .map_err(|error| CodecError(format!("snappy: {error}")))?;
                out.truncate(start + written);
            }
            Compression::Lz4 => {
                out.resize(
                    start + lz4_flex::block::get_maximum_output_size(records.len()),
                    0,
                );
                let written = lz4_flex::block::compress_into(records, &mut out[start..])
                    .map_err(|error| CodecError(format!("lz4: {error}")))?;
                out.truncate(start + written);
            }
            Compression::Zstd => {
                out.resize(start + zstd::zstd_safe::compress_bound(records.len()), 0);
                let written = ZSTD.with(|cell| {
                    let mut contexts = cell.borrow_mut();
                    let compressor = contexts.compressor()?;
                    compressor
                        .compress_to_buffer(records, &mut out[start..])
                        .map_err(|error| CodecError(format!("zstd: {error}")))
                })?;
                out.truncate(start + written);
            }
        }
        Ok(())
    }

    /// Decodes `block` into exactly `records_bytes` bytes. Fails if the header
    /// declares more than [`RECORDS_BYTES_MAX`], if the block is damaged, or if
    /// it decodes to any other length.
    pub fn decompress(self, block: &[u8], records_bytes: usize) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.decompress_into(block, records_bytes, &mut out)?;
        Ok(out)
    }

    /// As [`Compression::decompress`], into `out` (cleared first; its
    /// allocation is reused).
    pub fn decompress_into(
        self,
        block: &[u8],
        records_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        out.clear();
        if self == Compression::None {
            if block.len() != records_bytes {
                return Err(CodecError(format!(
                    "{} record bytes where {records_bytes} were declared",
                    block.len()
                )));
            }
            out.extend_from_slice(block);
            return Ok(());
        }
        if records_bytes == 0 || records_bytes > RECORDS_BYTES_MAX {
            return Err(CodecError(format!(
                "a compressed batch declares {records_bytes} record bytes (1..={RECORDS_BYTES_MAX})"
            )));
        }
        out.resize(records_bytes, 0);
        let written = match self {
            Compression::None => unreachable!("handled above"),
            Compression::Snappy => {
                let claimed = snap::raw::decompress_len(block)
                    .map_err(|error| CodecError(format!("snappy: {error}")))?;
                if claimed != records_bytes {
                    return Err(CodecError(format!(
                        "snappy block holds {claimed} bytes where {records_bytes} were declared"
                    )));
                }
                snap::raw::Decoder::new()
                    .decompress(block, out)
                    .map_err(|error| CodecError(format!("snappy: {error}")))?
            }
            Compression::Lz4 => lz4_flex::block::decompress_into(block, out)
                .map_err(|error| CodecError(format!("lz4: {error}")))?,
            Compression::Zstd => ZSTD.with(|cell| {
                let mut contexts = cell.borrow_mut();
                let decompressor = contexts.decompressor()?;
                decompressor
                    .decompress_to_buffer(block, &mut out[..])
                    .map_err(|error| CodecError(format!("zstd: {error}")))
            })?,
        };
        if written != records_bytes {
            out.clear();
            return Err(CodecError(format!(
                "{} block decodes to {written} bytes where {records_bytes} were declared",
                self.name()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(text: &str) -> Result<Compression, String> {
        Compression::ALL
            .into_iter()
            .find(|codec| codec.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| format!("unknown compression {text:?}: none, snappy, lz4 or zstd"))
    }
}

/// zstd contexts, made once per thread (a context holds about a megabyte of
/// tables; making one per batch would cost more than compressing small batches).
#[derive(Default)]
struct ZstdContexts {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl ZstdContexts {
    fn compressor(&mut self) -> Result<&mut zstd::bulk::Compressor<'static>, CodecError> {
        if self.compressor.is_none() {
            let made = zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .map_err(|error| CodecError(format!("zstd: {error}")))?;
            self.compressor = Some(made);
        }
        self.compressor
            .as_mut()
            .ok_or_else(|| CodecError("zstd: no context".into()))
    }

    fn decompressor(&mut self) -> Result<&mut zstd::bulk::Decompressor<'static>, CodecError> {
        if self.decompressor.is_none() {
            let made = zstd::bulk::Decompressor::new()
                .map_err(|error| CodecError(format!("zstd: {error}")))?;
            self.decompressor = Some(made);
        }
        self.decompressor
            .as_mut()
            .ok_or_else(|| CodecError("zstd: no context".into()))
    }
}

thread_local! {
    static ZSTD: RefCell<ZstdContexts> = RefCell::new(ZstdContexts::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..50_000u32)
            .flat_map(|i| format!("{{\"user\":{},\"event\":\"click\"}}", i % 97).into_bytes())
            .collect()
    }

    #[test]
    fn every_codec_round_trips_and_the_compressing_ones_shrink_text() {
        let records = sample();
        for codec in Compression::ALL {
            let mut out = b"head".to_vec();
            codec.compress_into(&records, &mut out).unwrap();
            assert_eq!(&out[..4], b"head", "{codec}: appends");
            let block = &out[4..];
            if codec != Compression::None {
                assert!(block.len() * 4 < records.len(), "{codec}: {}", block.len());
            }
            assert_eq!(codec.decompress(block, records.len()).unwrap(), records);
            assert_eq!(
                Compression::from_attributes(codec.attribute_bits()),
                Some(codec)
            );
            assert_eq!(codec.name().parse::<Compression>().unwrap(), codec);
        }
    }

    #[test]
    fn a_wrong_declared_length_or_damage_is_an_error_not_a_panic() {
        let records = sample();
        for codec in Compression::ALL {
            let mut block = Vec::new();
            codec.compress_into(&records, &mut block).unwrap();
            for declared in [records.len() - 1, records.len() + 1] {
                assert!(codec.decompress(&block, declared).is_err(), "{codec}");
            }
            if codec == Compression::None {
                continue;
            }
            assert!(codec.decompress(&block, RECORDS_BYTES_MAX + 1).is_err());
            assert!(codec.decompress(&block, 0).is_err());
            assert!(codec
                .decompress(&block[..block.len() / 2], records.len())
                .is_err());
            for at in [0, block.len() / 3, block.len() - 1] {
                let mut damaged = block.clone();
                damaged[at] ^= 0x5a;
                // Damage may still decode (the CRC is what catches it); it must
                // not panic or produce another length.
                if let Ok(decoded) = codec.decompress(&damaged, records.len()) {
                    assert_eq!(decoded.len(), records.len());
                }
            }
            assert!(codec.decompress(&[0xff; 64], records.len()).is_err());
        }
        assert_eq!(Compression::from_attributes(1), None);
        assert_eq!(Compression::from_attributes(7), None);
        assert!("gzip".parse::<Compression>().is_err());
    }
}
