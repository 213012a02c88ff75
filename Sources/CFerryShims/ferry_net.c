#include "ferry_net.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/neighbour.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

int ferry_tap_open(const char *name, char *actual) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    if (name) strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    memcpy(actual, ifr.ifr_name, IFNAMSIZ);
    actual[IFNAMSIZ - 1] = 0;
    return fd;
}

/* One interface ioctl on a throw-away socket: `ifr` names `ifname` and carries the argument and
 * the answer. 0 or -errno. */
static int interface_ioctl(const char *ifname, unsigned long request, struct ifreq *ifr) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    strncpy(ifr->ifr_name, ifname, IFNAMSIZ - 1);
    ifr->ifr_name[IFNAMSIZ - 1] = 0;
    int rc = ioctl(s, request, ifr) < 0 ? -errno : 0;
    close(s);
    return rc;
}

static int interface_index(const char *ifname) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    int rc = interface_ioctl(ifname, SIOCGIFINDEX, &ifr);
    return rc < 0 ? rc : ifr.ifr_ifindex;
}

int ferry_bridge_add_port(const char *bridge, const char *ifname) {
    int index = interface_index(ifname);
    if (index < 0) return index;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_ifindex = index;
    return interface_ioctl(bridge, SIOCBRADDIF, &ifr);
}

int ferry_link_set_up(const char *ifname) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    int rc = interface_ioctl(ifname, SIOCGIFFLAGS, &ifr);
    if (rc != 0) return rc;
    ifr.ifr_flags |= IFF_UP;
    return interface_ioctl(ifname, SIOCSIFFLAGS, &ifr);
}

int ferry_link_mac(const char *ifname, unsigned long long *mac) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    int rc = interface_ioctl(ifname, SIOCGIFHWADDR, &ifr);
    if (rc != 0) return rc;
    unsigned long long v = 0;
    for (int i = 0; i < 6; i++) v = v << 8 | (unsigned char)ifr.ifr_hwaddr.sa_data[i];
    *mac = v;
    return 0;
}

int ferry_bridge_pin_mac(const char *ifname, unsigned long long mac, int add) {
    int index = interface_index(ifname);
    if (index < 0) return index;
    int rc = 0;

    int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (nl < 0) return -errno;
    struct {
        struct nlmsghdr header;
        struct ndmsg neighbour;
        struct rtattr attribute;
        unsigned char address[8];
    } request;
    memset(&request, 0, sizeof request);
    request.header.nlmsg_len = NLMSG_LENGTH(sizeof(struct ndmsg)) + RTA_LENGTH(6);
    request.header.nlmsg_type = add ? RTM_NEWNEIGH : RTM_DELNEIGH;
    request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | (add ? NLM_F_CREATE | NLM_F_REPLACE : 0);
    request.header.nlmsg_seq = 1;
    request.neighbour.ndm_family = AF_BRIDGE;
    request.neighbour.ndm_ifindex = index;
    request.neighbour.ndm_state = NUD_NOARP;
    request.neighbour.ndm_flags = NTF_MASTER | (add ? NTF_STICKY : 0);
    request.attribute.rta_type = NDA_LLADDR;
    request.attribute.rta_len = RTA_LENGTH(6);
    for (int i = 0; i < 6; i++) request.address[i] = (unsigned char)(mac >> (40 - 8 * i));
    struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
    if (sendto(nl, &request, request.header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) {
        rc = -errno;
    } else {
        char answer[512];
        ssize_t n = recv(nl, answer, sizeof answer, 0);
        if (n < 0) rc = -errno;
        else {
            struct nlmsghdr *h = (struct nlmsghdr *)answer;
            if (NLMSG_OK(h, (unsigned)n) && h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                rc = e->error;   /* 0 or -errno */
            }
        }
    }
    close(nl);
    if (!add && rc == -ENOENT) rc = 0;
    return rc;
}

unsigned long long ferry_tcp_bytes_acked(int fd) {
    struct tcp_info info;
    socklen_t length = sizeof info;
    memset(&info, 0, sizeof info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0) return 0;
    if (length < offsetof(struct tcp_info, tcpi_bytes_acked) + sizeof info.tcpi_bytes_acked) return 0;
    return info.tcpi_bytes_acked;
}

unsigned int ferry_tcp_min_rtt_us(int fd) {
    struct tcp_info info;
    socklen_t length = sizeof info;
    memset(&info, 0, sizeof info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0) return 0;
    if (length < offsetof(struct tcp_info, tcpi_min_rtt) + sizeof info.tcpi_min_rtt) return 0;
    return info.tcpi_min_rtt == ~0U ? 0 : info.tcpi_min_rtt;
}
