package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
)

// ruleComment is the comment nft list shows on the drop rule.
const ruleComment = "bwagent: drop blocked UIDs"

// elemsPerMsg is the most set elements put in one netlink message. The
// element list is one attribute, whose length field has 16 bits: at most
// 4095 elements of elemBytes fit, and google/nftables silently truncates
// the length of a longer list. Longer lists take several messages of the
// same batch, which is still one transaction.
const elemsPerMsg = 4000

// Reconcile makes the kernel block exactly the UIDs in desired, which may
// hold duplicates, and reports what changed.
//
// If the table, set, chain or rule is missing or differs from what Reconcile
// builds (someone flushed the ruleset, deleted or added a rule, changed the
// chain, added objects to the table), Reconcile rebuilds the whole table in
// one transaction. Otherwise it adds and deletes set elements, in one
// transaction, and sends nothing at all if the set is already right.
//
// A protected UID in desired yields an error wrapping ErrProtectedUID, and
// the kernel is left as it is.
func (f *Firewall) Reconcile(desired []uint32) (Result, error) {
	want := slices.Clone(desired)
	slices.Sort(want)
	want = slices.Compact(want)
	for _, uid := range want {
		if f.protected.Has(uid) {
			return Result{}, fmt.Errorf("nft: %w %d may not be blocked", ErrProtectedUID, uid)
		}
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return Result{}, fmt.Errorf("nft: %w", ErrClosed)
	}
	// The generation is read before the state: if anything changes in
	// between, the next call sees a newer generation and reads again.
	gen, err := readGeneration(f.gen)
	if err != nil {
		return Result{}, wrap("get ruleset generation", err)
	}
	if gen != 0 && gen == f.verifiedGen && slices.Equal(want, f.verifiedSet) {
		return Result{}, nil
	}
	f.verifiedGen = 0
	intact, have, err := f.read()
	if err != nil {
		return Result{}, err
	}
	add, del := diff(want, have)
	res := Result{Recreated: !intact, Added: len(add), Removed: len(del)}
	switch {
	case !intact:
		err = f.rebuild(want)
	case len(add) > 0 || len(del) > 0:
		err = f.update(add, del)
	default:
		f.verifiedGen, f.verifiedSet = gen, want
	}
	if err != nil {
		return Result{}, err
	}
	return res, nil
}

// read returns whether the table is exactly as rebuild makes it, and the
// UIDs in the set, sorted. A missing set, or one that is not a set of UIDs,
// counts as empty.
func (f *Firewall) read() (intact bool, uids []uint32, err error) {
	t, err := f.conn.ListTableOfFamily(f.table.Name, f.table.Family)
	if isNotExist(err) {
		return false, nil, nil
	}
	if err != nil {
		return false, nil, wrap("get table inet "+f.table.Name, err)
	}
	// Use counts the chains, sets, stateful objects and flowtables in the
	// table: ours holds one chain and one set, and nothing else. A flag
	// such as dormant would disable the chain.
	intact = bigEndian(t.Flags) == 0 && bigEndian(t.Use) == 2

	set, err := f.conn.GetSetByName(f.table, f.set)
	var opErr *netlink.OpError
	switch {
	case isNotExist(err):
		intact = false
	case errors.As(err, &opErr):
		return false, nil, wrap("get set "+f.set, err)
	case err != nil:
		// google/nftables could not decode the set, so it is not ours.
		intact = false
	case !setOK(set):
		intact = false
	default:
		if uids, err = f.elements(set); err != nil {
			return false, nil, err
		}
	}

	if !intact {
		return false, uids, nil
	}

	chain, err := f.getChain()
	if err != nil {
		return false, nil, err
	}
	if chain == nil || !chainOK(chain) {
		return false, uids, nil
	}
	rules, err := f.conn.GetRules(f.table, chain)
	if err != nil {
		return false, nil, wrap("list chain "+f.chain, err)
	}
	intact = len(rules) == 1 && f.dropCounter(rules[0]) != nil
	return intact, uids, nil
}

// bigEndian corrects a big-endian attribute that google/nftables v0.3.0
// decoded in host byte order, as it does NFTA_TABLE_USE and
// NFTA_TABLE_FLAGS.
func bigEndian(v uint32) uint32 {
	return binary.BigEndian.Uint32(binary.NativeEndian.AppendUint32(nil, v))
}

// getChain returns the chain, or nil if it does not exist.
func (f *Firewall) getChain() (*nftables.Chain, error) {
	// ListChain hides the kernel's error number, so that a missing chain
	// cannot be told from a failure: look for it among all inet chains.
	chains, err := f.conn.ListChainsOfTableFamily(f.table.Family)
	if err != nil {
		return nil, wrap("list chains", err)
	}
	for _, c := range chains {
		if c.Table != nil && c.Table.Name == f.table.Name && c.Name == f.chain {
			c.Table = f.table
			return c, nil
		}
	}
	return nil, nil
}

// dumpAttempts is how often elements lists a set before giving up.
const dumpAttempts = 10

// elements returns the UIDs in set, sorted.
//
// The kernel lists a large set in parts, each resuming after as many
// elements as the parts before held. If the hash table behind the set is
// resized meanwhile, which the kernel does in the background after large
// changes, the listing repeats some elements and misses as many others.
// elements lists the set again until it holds no repeats.
func (f *Firewall) elements(set *nftables.Set) ([]uint32, error) {
	for attempt := 1; ; attempt++ {
		elems, err := f.conn.GetSetElements(set)
		if err != nil {
			return nil, wrap("list set "+f.set, err)
		}
		uids := make([]uint32, 0, len(elems))
		for _, e := range elems {
			if len(e.Key) != 4 {
				return nil, fmt.Errorf("nft: set %s holds a key of %d bytes, not a UID", f.set, len(e.Key))
			}
			uids = append(uids, binaryutil.NativeEndian.Uint32(e.Key))
		}
		slices.Sort(uids)
		if n := len(uids); len(slices.Compact(uids)) == n {
			return uids, nil
		}
		if attempt == dumpAttempts {
			return nil, fmt.Errorf("nft: list set %s: still inconsistent after %d attempts", f.set, attempt)
		}
		time.Sleep(time.Duration(attempt) * 10 * time.Millisecond)
	}
}

// setOK reports whether s is a plain set of UIDs, as rebuild makes it.
func setOK(s *nftables.Set) bool {
	return s.KeyType.GetNFTMagic() == nftables.TypeUID.GetNFTMagic() &&
		s.KeyType.Bytes == nftables.TypeUID.Bytes &&
		!s.Anonymous && !s.Constant && !s.Interval && !s.IsMap &&
		!s.HasTimeout && !s.Dynamic && !s.Concatenation
}

// chainOK reports whether c is a base chain as rebuild makes it.
func chainOK(c *nftables.Chain) bool {
	return c.Type == nftables.ChainTypeFilter &&
		c.Hooknum != nil && *c.Hooknum == *nftables.ChainHookOutput &&
		c.Priority != nil && *c.Priority == *nftables.ChainPriorityFilter &&
		c.Policy != nil && *c.Policy == nftables.ChainPolicyAccept
}

// dropCounter returns the counter of r if r is the drop rule,
//
//	meta skuid @blocked_uids counter drop
//
// and nil otherwise. Any register and comment will do.
func (f *Firewall) dropCounter(r *nftables.Rule) *expr.Counter {
	if len(r.Exprs) != 4 {
		return nil
	}
	meta, ok1 := r.Exprs[0].(*expr.Meta)
	lookup, ok2 := r.Exprs[1].(*expr.Lookup)
	counter, ok3 := r.Exprs[2].(*expr.Counter)
	verdict, ok4 := r.Exprs[3].(*expr.Verdict)
	if !ok1 || !ok2 || !ok3 || !ok4 ||
		meta.Key != expr.MetaKeySKUID || meta.SourceRegister ||
		lookup.SourceRegister != meta.Register || lookup.SetName != f.set ||
		lookup.Invert || lookup.IsDestRegSet ||
		verdict.Kind != expr.VerdictDrop {
		return nil
	}
	return counter
}

// rebuild replaces the table with a fresh one that blocks uids, in one
// transaction.
func (f *Firewall) rebuild(uids []uint32) error {
	const op = "rebuild table"
	elems := chunks(uids)
	if err := f.reserve(6+len(elems), len(uids)); err != nil {
		return wrap(op, err)
	}
	set := &nftables.Set{
		Table:        f.table,
		Name:         f.set,
		KeyType:      nftables.TypeUID,
		KeyByteOrder: binaryutil.NativeEndian,
	}
	policy := nftables.ChainPolicyAccept
	chain := &nftables.Chain{
		Table:    f.table,
		Name:     f.chain,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookOutput,
		Priority: nftables.ChainPriorityFilter,
		Policy:   &policy,
	}
	// Adding the table first makes its deletion succeed if it is absent.
	//
	//	nft -f - <<EOF
	//	add table inet bwagent
	//	delete table inet bwagent
	//	table inet bwagent {
	//		set blocked_uids {
	//			type uid
	//			elements = { 1001, 1002 }
	//		}
	//		chain output {
	//			type filter hook output priority filter; policy accept;
	//			meta skuid @blocked_uids counter drop comment "bwagent: drop blocked UIDs"
	//		}
	//	}
	//	EOF
	f.conn.AddTable(f.table)
	f.conn.DelTable(f.table)
	f.conn.AddTable(f.table)
	if err := f.conn.AddSet(set, nil); err != nil {
		return f.abort(op, err)
	}
	for _, e := range elems {
		if err := f.conn.SetAddElements(set, e); err != nil {
			return f.abort(op, err)
		}
	}
	f.conn.AddChain(chain)
	f.conn.AddRule(&nftables.Rule{
		Table: f.table,
		Chain: chain,
		Exprs: []expr.Any{
			// [ meta load skuid => reg 1 ]
			&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
			// [ lookup reg 1 set blocked_uids ]
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
			// [ counter pkts 0 bytes 0 ]
			&expr.Counter{},
			// [ immediate reg 0 drop ]
			&expr.Verdict{Kind: expr.VerdictDrop},
		},
		UserData: userdata.AppendString(nil, userdata.TypeComment, ruleComment),
	})
	if err := f.conn.Flush(); err != nil {
		return wrap(op, err)
	}
	return nil
}

// update adds and deletes set elements, in one transaction.
func (f *Firewall) update(add, del []uint32) error {
	const op = "update set"
	addElems, delElems := chunks(add), chunks(del)
	if err := f.reserve(len(addElems)+len(delElems), len(add)+len(del)); err != nil {
		return wrap(op, err)
	}
	set := &nftables.Set{Table: f.table, Name: f.set, KeyType: nftables.TypeUID}

	//	nft -f - <<EOF
	//	delete element inet bwagent blocked_uids { 1003 }
	//	add element inet bwagent blocked_uids { 1001, 1002 }
	//	EOF
	for _, e := range delElems {
		if err := f.conn.SetDeleteElements(set, e); err != nil {
			return f.abort(op, err)
		}
	}
	for _, e := range addElems {
		if err := f.conn.SetAddElements(set, e); err != nil {
			return f.abort(op, err)
		}
	}
	if err := f.conn.Flush(); err != nil {
		return wrap(op, err)
	}
	return nil
}

// abort drops a batch that could not be built, and returns err. As
// google/nftables cannot drop buffered messages but by sending them, abort
// ends the batch with the deletion of a table that cannot exist: the
// kernel refuses it, and with it the whole transaction.
func (f *Firewall) abort(op string, err error) error {
	// nft delete table inet ""
	f.conn.DelTable(&nftables.Table{Family: f.table.Family, Name: ""})
	f.conn.Flush()
	return wrap(op, err)
}

// chunks splits uids into lists of set elements, one per netlink message.
func chunks(uids []uint32) [][]nftables.SetElement {
	var lists [][]nftables.SetElement
	for c := range slices.Chunk(uids, elemsPerMsg) {
		elems := make([]nftables.SetElement, len(c))
		for i, uid := range c {
			elems[i].Key = binaryutil.NativeEndian.PutUint32(uid)
		}
		lists = append(lists, elems)
	}
	return lists
}

// diff returns the UIDs in want but not in have, and those in have but not
// in want. Both must be sorted and free of duplicates.
func diff(want, have []uint32) (add, del []uint32) {
	i, j := 0, 0
	for i < len(want) && j < len(have) {
		switch {
		case want[i] < have[j]:
			add = append(add, want[i])
			i++
		case want[i] > have[j]:
			del = append(del, have[j])
			j++
		default:
			i++
			j++
		}
	}
	add = append(add, want[i:]...)
	del = append(del, have[j:]...)
	return add, del
}
