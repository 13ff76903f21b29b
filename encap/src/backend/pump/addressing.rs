//! Addressing a TUN device for our lease, kept apart from the state the packet threads share:
//! the control plane alone does netlink.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::DeviceState;
use crate::backend::BackendError;
use crate::netlink::Netlink;

/// The TUN device's addressing: what we gave it, to give it again if someone removes it.
pub(crate) struct Addressing {
    device: &'static str,
    /// Our lease's subnet and the Network, once we hold a lease.
    adopted: Option<(Ipv4Net, Ipv4Net)>,
}

impl Addressing {
    pub fn new(device: &'static str) -> Self {
        Addressing {
            device,
            adopted: None,
        }
    }

    /// Points the device at our lease: it gets the lease's network address with the whole
    /// Network's prefix (so the kernel routes every other node's pods into it), the pump's
    /// MTU, and is brought up; the packet threads then take packets for `subnet` as ours.
    pub async fn adopt(
        &mut self,
        netlink: &Netlink,
        state: &DeviceState,
        subnet: Ipv4Net,
        network: Ipv4Net,
    ) -> Result<(), BackendError> {
        state.set_own_subnet(subnet);
        self.adopted = Some((subnet, network));
        self.apply(netlink, state, subnet, network).await
    }

    /// Gives the device its address again if someone removed it; `Ok(true)` when it had to.
    pub async fn repair(
        &self,
        netlink: &Netlink,
        state: &DeviceState,
    ) -> Result<bool, BackendError> {
        let Some((subnet, network)) = self.adopted else {
            return Ok(false);
        };
        let link = netlink.link_by_name(self.device).await?;
        let want = IpAddr::V4(subnet.network());
        let present = netlink
            .addresses()
            .await?
            .iter()
            .any(|(i, a)| *i == link.index && a.addr() == want);
        if present {
            return Ok(false);
        }
        tracing::warn!(
            device = self.device,
            "our device lost its address: restoring it"
        );
        self.apply(netlink, state, subnet, network).await?;
        Ok(true)
    }

    async fn apply(
        &self,
        netlink: &Netlink,
        state: &DeviceState,
        subnet: Ipv4Net,
        network: Ipv4Net,
    ) -> Result<(), BackendError> {
        let device = self.device;
        let link = netlink.link_by_name(device).await?;
        let addr = Ipv4Net::new(subnet.network(), network.prefix_len())
            .map_err(|e| BackendError::Config(format!("address for {device}: {e}")))?;
        netlink
            .set_sole_address(link.index, IpNet::V4(addr))
            .await?;
        netlink.set_mtu_up(link.index, state.mtu as u32).await?;
        Ok(())
    }
}
