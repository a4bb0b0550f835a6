package nft

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// errNoGeneration means the kernel's answer to NFT_MSG_GETGEN held no
// generation number.
var errNoGeneration = errors.New("no ruleset generation in the kernel's answer")

// dialGeneration opens the socket that generation queries go through, in
// the network namespace netNS (0: the caller's).
func dialGeneration(netNS int) (*netlink.Conn, error) {
	return netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netNS})
}

// readGeneration returns the namespace's nftables ruleset generation: a
// number the kernel raises on every committed transaction, whoever sends it.
//
//	nft list ruleset   (its first line, "# generation N", with -d)
func readGeneration(c *netlink.Conn) (uint32, error) {
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN),
			Flags: netlink.Request,
		},
		// struct nfgenmsg: family, version, resource id.
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, err
	}
	if len(msgs) != 1 || len(msgs[0].Data) < 4 {
		return 0, fmt.Errorf("%w: %d messages", errNoGeneration, len(msgs))
	}
	ad, err := netlink.NewAttributeDecoder(msgs[0].Data[4:])
	if err != nil {
		return 0, err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_GEN_ID {
			return ad.Uint32(), nil
		}
	}
	if err := ad.Err(); err != nil {
		return 0, err
	}
	return 0, errNoGeneration
}
