#include "ferry_net.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
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

static int control_socket(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    return s < 0 ? -errno : s;
}

int ferry_bridge_add_port(const char *bridge, const char *ifname) {
    int s = control_socket();
    if (s < 0) return s;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    int rc = 0;
    if (ioctl(s, SIOCGIFINDEX, &ifr) < 0) rc = -errno;
    else {
        int index = ifr.ifr_ifindex;
        memset(&ifr, 0, sizeof ifr);
        strncpy(ifr.ifr_name, bridge, IFNAMSIZ - 1);
        ifr.ifr_ifindex = index;
        if (ioctl(s, SIOCBRADDIF, &ifr) < 0) rc = -errno;
    }
    close(s);
    return rc;
}

int ferry_link_set_up(const char *ifname) {
    int s = control_socket();
    if (s < 0) return s;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    int rc = 0;
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) rc = -errno;
    else {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) rc = -errno;
    }
    close(s);
    return rc;
}

int ferry_link_mac(const char *ifname, unsigned long long *mac) {
    int s = control_socket();
    if (s < 0) return s;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    int rc = 0;
    if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0) rc = -errno;
    else {
        unsigned long long v = 0;
        for (int i = 0; i < 6; i++) v = v << 8 | (unsigned char)ifr.ifr_hwaddr.sa_data[i];
        *mac = v;
    }
    close(s);
    return rc;
}
