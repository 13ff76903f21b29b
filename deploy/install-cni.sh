#!/bin/sh
# The DaemonSet's init container: installs our `flannel` CNI plugin, the standard plugins it
# delegates to (only where the node has none), and the conflist.
#
# Every file is written next to its target and renamed into place: a plugin binary a runtime
# is executing cannot be overwritten in place ("text file busy"), and a runtime watching
# /etc/cni/net.d must never read half a conflist. Paths can be overridden for tests.
set -eu

SRC_BIN=${SRC_BIN:-/opt/bin}                      # our binaries in the image
STD_BIN=${STD_BIN:-/usr/lib/cni}                  # Debian's containernetworking-plugins
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}          # host's, mounted
CNI_CONF_DIR=${CNI_CONF_DIR:-/etc/cni/net.d}      # host's, mounted
CNI_CONF=${CNI_CONF:-/etc/kube-flannel/cni-conf.json}
CNI_CONF_NAME=${CNI_CONF_NAME:-10-flannel.conflist}

install_atomic() { # source target mode
  tmp="$2.flanneld-rs.$$"
  cp "$1" "$tmp"
  chmod "$3" "$tmp"
  mv -f "$tmp" "$2"
}

mkdir -p "$CNI_BIN_DIR" "$CNI_CONF_DIR"
install_atomic "$SRC_BIN/flannel" "$CNI_BIN_DIR/flannel" 0755
echo "installed $CNI_BIN_DIR/flannel"
# The cluster's own plugins win: kubeadm and distributions install them with their versions.
for plugin in bridge host-local loopback portmap; do
  if [ ! -e "$CNI_BIN_DIR/$plugin" ] && [ -e "$STD_BIN/$plugin" ]; then
    install_atomic "$STD_BIN/$plugin" "$CNI_BIN_DIR/$plugin" 0755
    echo "installed $CNI_BIN_DIR/$plugin (the node had none)"
  fi
done
install_atomic "$CNI_CONF" "$CNI_CONF_DIR/$CNI_CONF_NAME" 0644
echo "installed $CNI_CONF_DIR/$CNI_CONF_NAME"
