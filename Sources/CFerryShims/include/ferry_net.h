// Network devices: what Swift cannot import from glibc (ioctl is variadic).
#ifndef FERRY_NET_H
#define FERRY_NET_H
#include <sys/select.h>

/// Creates (or attaches to) the tap device `name` (IFF_TAP | IFF_NO_PI: one Ethernet frame per read
/// or write), non-blocking and close-on-exec; a device created here goes away with the descriptor.
/// An empty `name` lets the kernel pick one. The actual name is written to `actual` (16 bytes).
/// Returns the descriptor or -errno.
int ferry_tap_open(const char *name, char *actual);

/// Makes `ifname` a port of bridge `bridge` (SIOCBRADDIF). 0 or -errno.
int ferry_bridge_add_port(const char *bridge, const char *ifname);

/// Sets `ifname` up (SIOCSIFFLAGS with IFF_UP). 0 or -errno.
int ferry_link_set_up(const char *ifname);

/// The hardware address of `ifname` in the low 48 bits of *mac (SIOCGIFHWADDR). 0 or -errno.
int ferry_link_mac(const char *ifname, unsigned long long *mac);
/// Pins (`add` != 0) or unpins the bridge's forwarding entry for `mac` (low 48 bits) to port `ifname`:
/// a static, sticky entry (RTM_NEWNEIGH, NTF_MASTER | NTF_STICKY, NUD_NOARP), which frames from the
/// same MAC on another port do not move (`bridge fdb replace MAC dev IFNAME master static sticky`).
/// 0 or -errno (unpinning an entry that is not there is 0).
int ferry_bridge_pin_mac(const char *ifname, unsigned long long mac, int add);
#endif

/// Bytes of a TCP socket's stream the peer has acknowledged (TCP_INFO `tcpi_bytes_acked`): what crossed the
/// link, unlike what was written into the send buffer. 0 on error (errno set) or for a non-TCP socket.
unsigned long long ferry_tcp_bytes_acked(int fd);

/// The smallest round trip a TCP socket has measured (TCP_INFO `tcpi_min_rtt`), in microseconds: the
/// link's own round trip, without its queues. 0 on error, before any sample, or for a non-TCP socket.
unsigned int ferry_tcp_min_rtt_us(int fd);
