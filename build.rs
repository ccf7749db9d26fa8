//! Release binaries pack their relative relocations (DT_RELR, `-z pack-relative-relocs`): the
//! table the loader walks at start shrinks from about 400 KB to 10 KB, pages that would otherwise
//! stay resident for the daemon's life. Running such a binary needs glibc 2.36 (Debian 12,
//! Raspberry Pi OS 12) and linking it binutils 2.38 or lld; `TERN_NO_RELR=1` builds without it.
//!
//! They also link the functions a daemon runs first, together (`link/hot.ld`, made by
//! `bench/hot_code.sh`): the kernel maps 64 KiB of code around each page that runs, so spread
//! over the binary they kept nearly all of its 10 MB resident. The script needs GNU ld or lld;
//! `TERN_NO_LAYOUT=1` builds without it (e.g. with mold).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TERN_NO_RELR");
    println!("cargo:rerun-if-env-changed=TERN_NO_LAYOUT");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let linux_gnu = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if release && linux_gnu && std::env::var_os("TERN_NO_RELR").is_none() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if release && linux_gnu && std::env::var_os("TERN_NO_LAYOUT").is_none() {
        let dir = var("CARGO_MANIFEST_DIR");
        println!("cargo:rerun-if-changed=link/hot.ld");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link/hot.ld");
    }
}
