package xraystats

// Internals for the tests of package xraystats_test, which run real Xray
// processes through internal/xraytest (itself an importer of this package).

import (
	"context"

	"github.com/myvpn/bwagent/xraystats/internal/xraypb/handlercmdpb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/protocolpb"
)

// RawAddUser adds the user to the inbound through HandlerService.AlterInbound
// without AddUser's check for an existing email first: what Xray itself
// answers to adding an email that is there, as classified by c.
func RawAddUser(ctx context.Context, c *Client, inboundTag, email string, acct Account) error {
	am, err := accountMessage(acct)
	if err != nil {
		return err
	}
	account, err := typed(am)
	if err != nil {
		return err
	}
	op, err := typed(&handlercmdpb.AddUserOperation{User: &protocolpb.User{Email: email, Account: account}})
	if err != nil {
		return err
	}
	return c.call(ctx, "raw add", func(ctx context.Context) error {
		_, err := c.handler.AlterInbound(ctx, &handlercmdpb.AlterInboundRequest{Tag: inboundTag, Operation: op})
		return err
	})
}

// OnlineIPListsInFlight is how many GetStatsOnlineIpList requests one
// OnlineUsers call may have in flight at once.
const OnlineIPListsInFlight = onlineIPListsInFlight
