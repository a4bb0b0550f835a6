package bpf

import (
	"errors"
	"fmt"
	"maps"
	"strings"

	"github.com/cilium/ebpf"
)

// Accounts are the IDs of users who are no UIDs (Xray's): AccountBase to
// AccountBase+MaxAccounts-1. systemd documents the UIDs from 2^31 on as
// never allocated, so an account is never a real UID. They must match
// ACCOUNT_BASE and MAX_ACCOUNTS in bwacct.c.
//
// An account is counted (EachCounter, EachMoved, CountersOf) and enforced
// (Policy) as a UID is, in the same maps: accounts and UIDs together are at
// most Config.MaxUIDs in the counter, policy and quota maps.
const (
	AccountBase uint32 = 0xC0000000
	MaxAccounts        = 1 << 20
)

// accountNameMax is the size of a name in bw_accounts.
const accountNameMax = 128

// Account returns name's account ID, allocating the next free one for a
// new name. The registry (bw_accounts) is pinned with the counters, so a
// name keeps its ID exactly as long as the counters keep its bytes: an agent
// that restarts or crashes finds the same IDs. An ID is never reused within
// the maps' life. A name of 1 to 128 bytes without a NUL is valid, else
// the error wraps ErrAccountName; a registry that has given out every ID
// fails with ErrAccountsFull. Safe for concurrent use.
func (d *Datapath) Account(name string) (uint32, error) {
	if name == "" || len(name) > accountNameMax || strings.IndexByte(name, 0) >= 0 {
		return 0, fmt.Errorf("%w: %q", ErrAccountName, name)
	}
	d.acctMu.Lock()
	defer d.acctMu.Unlock()
	if id, ok := d.accountIDs[name]; ok {
		return id, nil
	}
	if d.nextAccount-AccountBase >= MaxAccounts {
		return 0, fmt.Errorf("account %q: %w", name, ErrAccountsFull)
	}
	id := d.nextAccount
	var v bwacctAccountName
	for i := range len(name) {
		v.Name[i] = int8(name[i])
	}
	// In the registry before anyone uses the ID.
	if err := d.objs.BwAccounts.Update(id, v, ebpf.UpdateNoExist); err != nil {
		if errors.Is(err, ebpf.ErrKeyExist) {
			// Not ours: someone wrote the pinned map behind our back.
			return 0, fmt.Errorf("register account %q as %d: the ID is taken: %w", name, id, err)
		}
		return 0, fmt.Errorf("register account %q: %w", name, err)
	}
	d.nextAccount++
	d.accountIDs[name] = id
	d.setAccountName(id, name)
	return id, nil
}

// AccountName returns the name of account id; ok is false for an ID the
// registry does not have.
func (d *Datapath) AccountName(id uint32) (name string, ok bool) {
	d.acctMu.Lock()
	defer d.acctMu.Unlock()
	if i := id - AccountBase; id >= AccountBase && i < uint32(len(d.accountNames)) {
		name = d.accountNames[i]
	}
	return name, name != ""
}

// setAccountName records name as account id's, id being at most
// MaxAccounts past AccountBase; d.acctMu held.
func (d *Datapath) setAccountName(id uint32, name string) {
	i := int(id - AccountBase)
	if i >= len(d.accountNames) {
		d.accountNames = append(d.accountNames, make([]string, i+1-len(d.accountNames))...)
	}
	d.accountNames[i] = name
}

// Accounts returns every account, name to ID: a copy, the caller's to
// change.
func (d *Datapath) Accounts() map[string]uint32 {
	d.acctMu.Lock()
	defer d.acctMu.Unlock()
	return maps.Clone(d.accountIDs)
}

// loadAccounts reads bw_accounts, which an earlier agent may have written,
// into the caches; the next free ID follows the highest one given out.
func (d *Datapath) loadAccounts() error {
	d.acctMu.Lock()
	defer d.acctMu.Unlock()
	d.accountIDs = make(map[string]uint32)
	d.accountNames = nil
	d.nextAccount = AccountBase
	var id uint32
	var v bwacctAccountName
	it := d.objs.BwAccounts.Iterate()
	for it.Next(&id, &v) {
		if id-AccountBase >= MaxAccounts {
			continue // not Account's: written by hand; no ID to give out
		}
		var b []byte
		for _, c := range v.Name {
			if c == 0 {
				break
			}
			b = append(b, byte(c))
		}
		name := string(b)
		d.accountIDs[name] = id
		d.setAccountName(id, name)
		if id >= d.nextAccount {
			d.nextAccount = id + 1
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read accounts: %w", err)
	}
	return nil
}

// AccountOf returns name's account ID if it has one, without allocating.
func (d *Datapath) AccountOf(name string) (id uint32, ok bool) {
	d.acctMu.Lock()
	defer d.acctMu.Unlock()
	id, ok = d.accountIDs[name]
	return id, ok
}
