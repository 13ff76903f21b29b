//! Addressing a TUN device for our lease, kept apart from the state the packet threads share:
//! the control plane alone does netlink.

use ipnet::IpNet;

use super::{DeviceState, OwnSubnets};
use crate::backend::BackendError;
use crate::netlink::Netlink;

/// One address family a device carries: our lease's subnet and the Network it lies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Family {
    pub subnet: IpNet,
    pub network: IpNet,
}

impl Family {
    /// The device's address: the lease's network address with the whole Network's prefix, so
    /// that the kernel routes every other node's pods of that family into the device (the one
    /// route for the Network, as Flannel installs it).
    fn address(&self) -> Result<IpNet, BackendError> {
        IpNet::new(self.subnet.network(), self.network.prefix_len())
            .map_err(|e| BackendError::Config(format!("address for {}: {e}", self.subnet)))
    }
}

/// The subnets the packet threads take as ours.
fn own_subnets(families: &[Family]) -> OwnSubnets {
    let mut own = OwnSubnets::default();
    for f in families {
        match f.subnet.trunc() {
            IpNet::V4(n) => own.v4 = Some(n),
            IpNet::V6(n) => own.v6 = Some(n),
        }
    }
    own
}

/// The TUN device's addressing: what we gave it, to give it again if someone removes it.
pub(crate) struct Addressing {
    device: &'static str,
    /// One entry per family the device carries, once we hold a lease.
    adopted: Vec<Family>,
}

impl Addressing {
    pub fn new(device: &'static str) -> Self {
        Addressing {
            device,
            adopted: Vec::new(),
        }
    }

    /// Points the device at our lease: the pump's MTU, up, and an address per family (see
    /// [`Family::address`]); the packet threads then take packets for those subnets as ours.
    pub async fn adopt(
        &mut self,
        netlink: &Netlink,
        state: &DeviceState,
        families: &[Family],
    ) -> Result<(), BackendError> {
        state.set_own(own_subnets(families));
        self.adopted = families.to_vec();
        self.apply(netlink, state).await
    }

    /// Gives the device its addresses again if someone removed one; `Ok(true)` when it had to.
    pub async fn repair(
        &self,
        netlink: &Netlink,
        state: &DeviceState,
    ) -> Result<bool, BackendError> {
        if self.adopted.is_empty() {
            return Ok(false);
        }
        let link = netlink.link_by_name(self.device).await?;
        let present = netlink.addresses().await?;
        let mut missing = false;
        for f in &self.adopted {
            let want = f.subnet.network();
            missing |= !present
                .iter()
                .any(|(i, a)| *i == link.index && a.addr() == want);
        }
        if !missing {
            return Ok(false);
        }
        tracing::warn!(
            device = self.device,
            "our device lost its address: restoring it"
        );
        self.apply(netlink, state).await?;
        Ok(true)
    }

    async fn apply(&self, netlink: &Netlink, state: &DeviceState) -> Result<(), BackendError> {
        let link = netlink.link_by_name(self.device).await?;
        // MTU first: setting one below IPv6's 1280 later would silently drop the device's IPv6
        // address, while adding one to such a device fails here, loudly.
        netlink.set_mtu_up(link.index, state.mtu as u32).await?;
        for f in &self.adopted {
            netlink.set_sole_address(link.index, f.address()?).await?;
        }
        Ok(())
    }
}
