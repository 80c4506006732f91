//! A full disk: the WAL lives on a small loop-mounted ext4 filesystem that this test
//! creates. Appends fail with a clear DiskFull error, nothing acknowledged is lost,
//! and appends resume once space is freed.
//!
//! Needs root (mount) and e2fsprogs; `.ci/run` runs as root.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sluice_broker::storage::{format, StorageError, Wal};
use sluice_broker::types::{Epoch, LogId};
use std::path::{Path, PathBuf};
use std::process::Command;

struct LoopMount {
    mount_point: PathBuf,
    unmounted: bool,
}

impl LoopMount {
    fn new(dir: &Path, megabytes: u64) -> LoopMount {
        let image = dir.join("fs.img");
        let mount_point = dir.join("mnt");
        std::fs::create_dir_all(&mount_point).unwrap();
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(megabytes << 20).unwrap();
        drop(file);
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status();
        assert!(
            mkfs.is_ok_and(|s| s.success()),
            "mkfs.ext4 failed: install e2fsprogs"
        );
        let mount = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount_point)
            .status();
        assert!(
            mount.is_ok_and(|s| s.success()),
            "mounting a loop filesystem failed: this test needs root"
        );
        LoopMount {
            mount_point,
            unmounted: false,
        }
    }

    fn is_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let point = self
            .mount_point
            .canonicalize()
            .unwrap_or_else(|_| self.mount_point.clone());
        mounts
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(point.to_str().unwrap_or("")))
    }

    /// Unmounts, retrying while the filesystem is still busy (files and io_uring
    /// rings of the executors that used it are released asynchronously after they
    /// stop), then lazily; `mount -o loop` sets autoclear, so the loop device is
    /// detached once the filesystem is gone. Returns why it failed, if it did.
    fn unmount(&mut self) -> Result<(), String> {
        if self.unmounted {
            return Ok(());
        }
        self.unmounted = true;
        for _ in 0..50 {
            let status = Command::new("umount")
                .arg(&self.mount_point)
                .stderr(std::process::Stdio::null())
                .status();
            if status.is_ok_and(|s| s.success()) || !self.is_mounted() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
        if self.is_mounted() {
            return Err(format!("{} is still mounted", self.mount_point.display()));
        }
        Ok(())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // On a failing test: best effort, never leave the mount behind silently.
        if let Err(error) = self.unmount() {
            eprintln!("wal_enospc: {error}");
        }
    }
}

#[test]
fn a_full_disk_gives_a_clear_error_and_loses_nothing_acknowledged() {
    let dir = scratch("enospc");
    let mount = LoopMount::new(&dir, 40);
    let data = mount.mount_point.join("data");
    let ballast = mount.mount_point.join("ballast");
    std::fs::write(&ballast, vec![1u8; 8 << 20]).unwrap();
    let config = config(&data, 4 << 20);
    let reopen = config.clone();
    let ballast_path = ballast.clone();
    let acked = run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        let mut acked = Vec::new();
        let mut disk_full = None;
        for i in 0..2000u64 {
            let frame = batch(4, 16_000, i);
            let info = format::verify_client_batch(&frame, usize::MAX).unwrap();
            match wal
                .append(LogId(1), Epoch(0), &[(frame.clone(), info)])
                .await
            {
                Ok(appended) => acked.push((appended.base_offset, frame)),
                Err(error) => {
                    disk_full = Some(error);
                    break;
                }
            }
        }
        let error = disk_full.expect("the filesystem must fill up");
        assert!(matches!(error, StorageError::DiskFull { .. }), "{error:?}");
        assert!(error.to_string().contains("disk full"), "{error}");
        // Nothing of the failed append is visible; what was acknowledged reads back.
        let got = read_all(&wal, 1, 0).await;
        assert_eq!(got.len(), acked.len());
        // Free space: appends resume, with the next offset.
        std::fs::remove_file(&ballast_path).unwrap();
        let next = acked.last().map(|(base, _)| base + 4).unwrap_or(0);
        let appended = append(&wal, 1, &batch(4, 16_000, 99_999)).await;
        assert_eq!(appended.base_offset, next);
        acked.push((appended.base_offset, batch(4, 16_000, 99_999)));
        wal.close().await;
        acked
    });
    assert!(acked.len() > 10);
    run(move || async move {
        let (wal, _) = Wal::open(reopen).await.unwrap();
        let got = read_all(&wal, 1, 0).await;
        assert_eq!(got.len(), acked.len());
        for (stored, (base, frame)) in got.iter().zip(&acked) {
            assert_eq!(format::header(stored).unwrap().base_offset.get(), *base);
            assert_eq!(client_bytes(stored), client_bytes(frame));
        }
        wal.close().await;
    });
    let mut mount = mount;
    mount
        .unmount()
        .expect("the test's loop filesystem unmounts");
}
