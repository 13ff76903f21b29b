//! The `flannel` CNI plugin binary: install it as /opt/cni/bin/flannel in place of Flannel's.
//! All logic lives in the `flannel_cni` library.

fn main() {
    std::process::exit(flannel_cni::main());
}
