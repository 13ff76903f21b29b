//! This node's WireGuard key pair, kept in a key file like Flannel's `/run/flannel/wgkey`: the
//! private key in base64 (what `wg genkey` prints, and what Flannel writes, without a newline),
//! generated on first start and reused on every restart, so that peers keep our public key.
//!
//! The file must be ours alone: one readable by group or others (Flannel writes 0600), or owned
//! by anyone but root or our own uid (its owner could swap in a key of their choosing), is
//! refused, never silently "fixed", since the key may already have leaked. A symlink is
//! followed; errors say where it points. A file that holds no key is an error too,
//! not a reason to overwrite it with a new one (that would cut the node off from peers that
//! still know the old public key, and destroy what an operator may want to inspect).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::backend::BackendError;

/// The key pair the noise state machine and the handshake lookup use.
pub(super) struct StaticKeys {
    pub secret: StaticSecret,
    pub public: PublicKey,
}

/// Decodes a base64 WireGuard key (44 characters, 32 bytes); surrounding whitespace is ignored
/// (`wg genkey > file` leaves a newline).
pub(super) fn decode_key(s: &str) -> Option<[u8; 32]> {
    let mut raw = STANDARD.decode(s.trim()).ok()?;
    let key = <[u8; 32]>::try_from(raw.as_slice()).ok();
    wipe(&mut raw);
    key
}

/// Whether `key` is a point of small order (the identity or one of the few points of order 2, 4
/// or 8, in any of their encodings): Diffie-Hellman with it gives zero whatever the secret, so
/// no handshake with it can complete (WireGuard refuses the zero result). Any secret shows it:
/// x25519 clamps secrets to multiples of the cofactor 8, which sends exactly those points to
/// zero.
pub(super) fn is_low_order(key: &[u8; 32]) -> bool {
    let probe = StaticSecret::from([0x5a; 32]);
    probe.diffie_hellman(&PublicKey::from(*key)).to_bytes() == [0; 32]
}

pub(super) fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// Overwrites a buffer that held key material; `black_box` keeps the stores from being
/// optimised away as dead.
pub(super) fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

fn key_err(path: &Path, what: impl std::fmt::Display) -> BackendError {
    // With a symlink the problem is usually at the target, so name it too.
    let shown = match fs::read_link(path) {
        Ok(target) => format!("{} (a symlink to {})", path.display(), target.display()),
        Err(_) => path.display().to_string(),
    };
    BackendError::Config(format!("WireGuard key file {shown}: {what}"))
}

/// Reads the key file, or creates it with a new key (mode 0600) if it does not exist.
pub(super) fn load_or_create(path: &Path) -> Result<StaticKeys, BackendError> {
    match fs::metadata(path) {
        Ok(_) => load(path),
        // A link whose target is missing: someone meant the key to live elsewhere, so a new
        // key is not created there behind their back.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && fs::read_link(path).is_ok() => {
            Err(key_err(
                path,
                "the link's target does not exist: restore it, or remove the link to get a new key",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(e) => Err(key_err(path, e)),
    }
}

fn load(path: &Path) -> Result<StaticKeys, BackendError> {
    let mut file = fs::File::open(path).map_err(|e| key_err(path, e))?;
    let meta = file.metadata().map_err(|e| key_err(path, e))?;
    if !meta.is_file() {
        return Err(key_err(path, "not a regular file"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(key_err(
            path,
            format!(
                "owned by uid {}, neither root nor us (uid {euid}), although it holds this node's \
                 private key: chown it if it never left this machine, else delete it to get a new key",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_err(
            path,
            format!(
                "accessible by group or others (mode {mode:04o}) although it holds this node's private key: \
                 chmod 600 it if it never left this machine, else delete it to get a new key"
            ),
        ));
    }
    // A key is 44 characters; anything much longer is not one (and is not read into memory).
    let mut text = Vec::with_capacity(128);
    Read::by_ref(&mut file)
        .take(128)
        .read_to_end(&mut text)
        .map_err(|e| key_err(path, e))?;
    let key = std::str::from_utf8(&text).ok().and_then(decode_key);
    wipe(&mut text);
    let key = key.ok_or_else(|| {
        key_err(
            path,
            "does not hold a WireGuard private key (44 base64 characters, as `wg genkey` prints); \
             fix or delete it (deleting gives this node a new key)",
        )
    })?;
    Ok(pair(key))
}

fn create(path: &Path) -> Result<StaticKeys, BackendError> {
    let mut key = random_key().map_err(|e| key_err(path, format!("generating a key: {e}")))?;
    // Clamped as `wg genkey` does, so the file reads the same in every tool.
    key[0] &= 248;
    key[31] = (key[31] & 127) | 64;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)
            .map_err(|e| key_err(path, format!("creating its directory: {e}")))?;
    }
    // Written under a temporary name, then linked into place: the link fails if someone else
    // created the file meanwhile, and then theirs is the key (read below).
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut text = encode_key(&key).into_bytes();
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    wipe(&mut text);
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            tracing::info!(file = %path.display(), "generated a new WireGuard key");
            Ok(pair(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            wipe(&mut key);
            load(path)
        }
        Err(e) => {
            wipe(&mut key);
            Err(key_err(path, format!("writing it: {e}")))
        }
    }
}

fn pair(mut key: [u8; 32]) -> StaticKeys {
    let secret = StaticSecret::from(key);
    wipe(&mut key);
    let public = PublicKey::from(&secret);
    StaticKeys { secret, public }
}

/// 32 bytes from the kernel's CSPRNG.
pub(super) fn random_key() -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    let mut filled = 0;
    while filled < key.len() {
        let rest = &mut key[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the live buffer `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_order_keys_are_told_apart() {
        // u = 0 (order 2... or the identity), u = 1 (order 4), and u = p = 2^255 - 19, a
        // non-canonical encoding of 0.
        let mut p = [0xff; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        for low in [
            [0u8; 32],
            {
                let mut one = [0u8; 32];
                one[0] = 1;
                one
            },
            p,
        ] {
            assert!(is_low_order(&low), "{low:?}");
        }
        let real = PublicKey::from(&StaticSecret::from([7; 32]));
        assert!(!is_low_order(real.as_bytes()));
    }

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/wgkey");
        let a = load_or_create(&path).expect("created");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(
            text.len(),
            44,
            "base64 without newline, as Flannel writes it"
        );
        let b = load_or_create(&path).expect("reloaded");
        assert_eq!(a.public.as_bytes(), b.public.as_bytes());
        let leftovers: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn reads_wg_genkey_output() {
        // RFC 7748's Alice: the public key is known.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wgkey");
        let secret = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
        fs::write(&path, format!("{secret}\n")).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        let k = load_or_create(&path).expect("loads");
        assert_eq!(
            encode_key(k.public.as_bytes()),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn refuses_shared_or_corrupt_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wgkey");
        load_or_create(&path).expect("created");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(&path)
            .err()
            .expect("world-readable")
            .to_string();
        assert!(err.contains("mode 0644") && err.contains("wgkey"), "{err}");

        fs::write(&path, "not a key").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = load_or_create(&path).err().expect("corrupt").to_string();
        assert!(
            err.contains("does not hold a WireGuard private key"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "not a key",
            "left alone"
        );

        fs::remove_file(&path).expect("rm");
        fs::create_dir(&path).expect("mkdir");
        let err = load_or_create(&path).err().expect("directory").to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn refuses_a_file_owned_by_someone_else() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown to another uid needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wgkey");
        load_or_create(&path).expect("created");
        std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
        let err = load_or_create(&path)
            .err()
            .expect("foreign owner")
            .to_string();
        assert!(
            err.contains("owned by uid 65534") && err.contains("wgkey"),
            "{err}"
        );
        // Root's own file is fine whoever we are.
        std::os::unix::fs::chown(&path, Some(0), None).expect("chown back");
        load_or_create(&path).expect("root-owned");
    }

    #[test]
    fn symlinks_are_followed_and_named_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("real-key");
        let link = dir.path().join("wgkey");
        let created = load_or_create(&target).expect("created");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let loaded = load_or_create(&link).expect("through the link");
        assert_eq!(created.public.as_bytes(), loaded.public.as_bytes());

        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(&link).err().expect("shared").to_string();
        assert!(
            err.contains(&format!(
                "{} (a symlink to {})",
                link.display(),
                target.display()
            )) && err.contains("mode 0644"),
            "{err}"
        );
    }

    #[test]
    fn dangling_symlink_is_named_not_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("gone/wgkey");
        let link = dir.path().join("wgkey");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = load_or_create(&link).err().expect("dangling").to_string();
        assert!(
            err.contains(&link.display().to_string())
                && err.contains(&target.display().to_string())
                && err.contains("does not exist"),
            "{err}"
        );
        assert!(!target.exists(), "no key written through the link");
        assert!(fs::symlink_metadata(&link).expect("link").is_symlink());
    }

    #[test]
    fn key_codec() {
        let k = [7u8; 32];
        assert_eq!(decode_key(&encode_key(&k)), Some(k));
        assert_eq!(decode_key(" \n"), None);
        assert_eq!(decode_key("AAAA"), None);
        assert_eq!(decode_key("!!!!"), None);
    }
}
