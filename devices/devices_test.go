package devices

import (
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
)

var t0 = time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)

func conn(client string, at int, proto quota.Protocol) Conn {
	return Conn{Client: netip.MustParseAddrPort(client), Server: netip.MustParseAddr("198.51.100.1"), Proto: proto, Since: t0.Add(time.Duration(at) * time.Second)}
}

func keys(devs []Device) []string {
	var out []string
	for _, d := range devs {
		out = append(out, d.Key.String())
	}
	return out
}

// TestGroup: one device per IPv4 address and per IPv6 prefix, counted once
// across protocols and connections, each connection of a proxy on the host
// a device of its own; oldest first.
func TestGroup(t *testing.T) {
	conns := []Conn{
		conn("203.0.113.7:40000", 5, quota.SSH),           // 0
		conn("203.0.113.7:40001", 3, quota.VLESS),         // 1: same device, older
		conn("[::ffff:203.0.113.7]:40002", 9, quota.SSH),  // 2: IPv4-mapped: the same
		conn("[2001:db8:1:2::10]:5000", 7, quota.Trojan),  // 3
		conn("[2001:db8:1:2:aaaa::1]:5001", 8, quota.SSH), // 4: same /64
		conn("[2001:db8:1:3::10]:5002", 1, quota.SSH),     // 5: another /64
		conn("198.51.100.9:1", 2, quota.SSH),              // 6
		{Client: netip.MustParseAddrPort("127.0.0.1:41000"), Server: netip.MustParseAddr("127.0.0.1"), Proto: quota.SSH, Since: t0.Add(4 * time.Second)},  // 7: proxy
		{Client: netip.MustParseAddrPort("127.0.0.1:41001"), Server: netip.MustParseAddr("127.0.0.1"), Proto: quota.SSH, Since: t0.Add(6 * time.Second)},  // 8: proxy, another
		{Client: netip.MustParseAddrPort("127.0.0.2:41002"), Server: netip.MustParseAddr("127.0.0.1"), Proto: quota.SSH, Since: t0.Add(10 * time.Second)}, // 9: a client at another loopback address
		{Client: netip.MustParseAddrPort("[::1]:41003"), Server: netip.MustParseAddr("::1"), Proto: quota.VLESS},                                          // 10: proxy, since the start
		{Proto: quota.SSH}, // 11: no address: left out
	}
	devs := Group(conns, 64)
	want := []string{"[::1]:41003", "2001:db8:1:3::/64", "198.51.100.9", "203.0.113.7", "127.0.0.1:41000", "127.0.0.1:41001", "2001:db8:1:2::/64", "127.0.0.2"}
	if got := keys(devs); !slices.Equal(got, want) {
		t.Fatalf("devices %v, want %v", got, want)
	}
	d := devs[3]
	if !slices.Equal(d.Conns, []int{0, 1, 2}) || !d.Since.Equal(t0.Add(3*time.Second)) || !slices.Equal(d.Protocols, []quota.Protocol{quota.SSH, quota.VLESS}) {
		t.Errorf("203.0.113.7: %+v", d)
	}
	if d := devs[6]; !slices.Equal(d.Conns, []int{3, 4}) || !slices.Equal(d.Protocols, []quota.Protocol{quota.SSH, quota.Trojan}) {
		t.Errorf("2001:db8:1:2::/64: %+v", d)
	}
	if !devs[4].Key.Local() || devs[3].Key.Local() || devs[7].Key.Local() {
		t.Error("Local")
	}
	if p := devs[6].Key.Prefix(); p != netip.MustParsePrefix("2001:db8:1:2::/64") {
		t.Errorf("prefix %v", p)
	}
	// A /128 is an address.
	if got := keys(Group(conns[3:5], 128)); !slices.Equal(got, []string{"2001:db8:1:2::10", "2001:db8:1:2:aaaa::1"}) {
		t.Errorf("/128: %v", got)
	}
	if len(Group(nil, 64)) != 0 {
		t.Error("no connections, devices")
	}
	// More devices than Group searches one by one: the same grouping
	// through its index, each device's second connection coming after all
	// the first ones.
	var many []Conn
	for round := range 2 {
		for i := range 3 * groupIndexed {
			many = append(many, conn(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}).String()+":"+strconv.Itoa(1000+round), i, quota.SSH))
		}
	}
	got := Group(many, 64)
	if len(got) != 3*groupIndexed {
		t.Fatalf("%d devices of %d connections, want %d", len(got), len(many), 3*groupIndexed)
	}
	for i, d := range got {
		if want := []int{i, i + 3*groupIndexed}; d.Key.String() != netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}).String() || !slices.Equal(d.Conns, want) {
			t.Errorf("device %d: %s with %v, want 192.0.2.%d with %v", i, d.Key, d.Conns, i, want)
		}
	}
}

// devs makes devices named by their IPv4 address's last byte, opened in
// the order given.
func devs(names ...int) []Device {
	var conns []Conn
	for i, n := range names {
		conns = append(conns, conn(netip.AddrFrom4([4]byte{192, 0, 2, byte(n)}).String()+":1000", i, quota.SSH))
	}
	return Group(conns, 64)
}

func refusedOf(names ...int) func(Key) bool {
	return func(k Key) bool {
		for _, n := range names {
			if k.prefix.Addr() == netip.AddrFrom4([4]byte{192, 0, 2, byte(n)}) {
				return true
			}
		}
		return false
	}
}

func TestLimit(t *testing.T) {
	const (
		A = Allowed
		R = Refused
		S = StillRefused
	)
	for _, c := range []struct {
		name    string
		devs    []int // in the order they came
		n       int
		which   Which
		refused []int
		want    []Verdict
	}{
		{"within the limit", []int{1, 2}, 2, Newest, nil, []Verdict{A, A}},
		{"no limit", []int{1, 2, 3}, 0, Newest, nil, []Verdict{A, A, A}},
		{"newest cut", []int{1, 2, 3}, 2, Newest, nil, []Verdict{A, A, R}},
		{"two too many", []int{1, 2, 3, 4}, 2, Newest, nil, []Verdict{A, A, R, R}},
		{"oldest cut", []int{1, 2, 3}, 2, Oldest, nil, []Verdict{R, A, A}},
		{"refused stays refused", []int{1, 2, 3}, 2, Newest, []int{3}, []Verdict{A, A, S}},
		// The refused device came back before another, newer, device: it
		// stays refused, and the newer one is allowed only if there is
		// room among the others.
		{"refused and a newer one", []int{1, 3, 4}, 2, Newest, []int{3}, []Verdict{A, S, A}},
		{"room again", []int{1, 3}, 2, Newest, []int{3}, []Verdict{A, A}},
		{"room for one of two", []int{1, 3, 4}, 2, Newest, []int{3, 4}, []Verdict{A, A, S}},
		// With oldest, the replaced device stays out while the others are
		// there: it does not replace another in turn.
		{"oldest: replaced stays out", []int{2, 3, 1}, 2, Oldest, []int{1}, []Verdict{A, A, S}},
		{"oldest: room again", []int{3, 1}, 2, Oldest, []int{1}, []Verdict{A, A}},
		{"limit one", []int{1, 2}, 1, Newest, nil, []Verdict{A, R}},
	} {
		ds := devs(c.devs...)
		got := Limit(ds, c.n, c.which, refusedOf(c.refused...))
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: %v for %v, want %v", c.name, got, keys(ds), c.want)
		}
	}
}

// TestSinceZero: connections open before the agent could tell are the
// oldest, so a new device never outranks them.
func TestSinceZero(t *testing.T) {
	conns := []Conn{conn("192.0.2.9:1", 1, quota.SSH), {Client: netip.MustParseAddrPort("192.0.2.5:2"), Proto: quota.VLESS}, {Client: netip.MustParseAddrPort("192.0.2.7:3"), Proto: quota.VLESS}}
	ds := Group(conns, 64)
	if got := keys(ds); !slices.Equal(got, []string{"192.0.2.5", "192.0.2.7", "192.0.2.9"}) {
		t.Fatalf("order %v", got)
	}
	if got := Limit(ds, 2, Newest, func(Key) bool { return false }); !slices.Equal(got, []Verdict{Allowed, Allowed, Refused}) {
		t.Errorf("%v", got)
	}
}
