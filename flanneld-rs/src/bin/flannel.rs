//! The `flannel` CNI plugin binary: install it as /opt/cni/bin/flannel in place of Flannel's.
//! All logic lives in `flanneld_rs::cni`.

fn main() {
    std::process::exit(flanneld_rs::cni::main());
}
