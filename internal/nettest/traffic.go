package nettest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Traffic helper modes, run by Start:
//
//	tcp-serve LISTEN            accept connections; each one moves what its client asks
//	tcp-client ADDR UP DOWN [MAX]  send UP bytes and receive DOWN bytes ("inf": until killed),
//	                             for at most MAX (a duration) if given
//	udp-echo LISTEN             echo datagrams back; exit after 2 s of silence
//	udp-client ADDR COUNT SIZE  send COUNT datagrams of SIZE bytes, collect the echoes
//
// Every mode prints "ADDR host:port" once it listens, "P sent received" progress
// lines every 50 ms and "DONE sent received" at the end, in payload bytes.
func init() {
	Register("tcp-serve", tcpServe)
	Register("tcp-client", tcpClient)
	Register("udp-echo", udpEcho)
	Register("udp-client", udpClient)
}

// Infinite, as UP or DOWN, moves data until the connection dies.
const Infinite = math.MaxUint64

var stdoutMu sync.Mutex

func say(format string, args ...any) {
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
}

func parseAmount(s string) (uint64, error) {
	if s == "inf" {
		return Infinite, nil
	}
	return strconv.ParseUint(s, 10, 64)
}

// ParseDone parses a "DONE sent received" or "P sent received" line.
func ParseDone(line string) (sent, received uint64, err error) {
	var tag string
	if _, err := fmt.Sscan(line, &tag, &sent, &received); err != nil {
		return 0, 0, fmt.Errorf("bad helper line %q: %w", line, err)
	}
	return sent, received, nil
}

func tcpServe(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: tcp-serve LISTEN")
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	say("ADDR %s", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			var hdr [16]byte
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return
			}
			// The client's UP is what we receive, its DOWN what we send.
			recvN := binary.BigEndian.Uint64(hdr[0:])
			sendN := binary.BigEndian.Uint64(hdr[8:])
			sent, recv := transfer(c.(*net.TCPConn), sendN, recvN, 0)
			say("DONE %d %d", sent, recv)
		}()
	}
}

func tcpClient(args []string) error {
	if len(args) != 3 && len(args) != 4 {
		return errors.New("usage: tcp-client ADDR UP DOWN [MAX]")
	}
	up, err := parseAmount(args[1])
	if err != nil {
		return err
	}
	down, err := parseAmount(args[2])
	if err != nil {
		return err
	}
	var limit time.Duration
	if len(args) == 4 {
		if limit, err = time.ParseDuration(args[3]); err != nil {
			return err
		}
	}
	c, err := net.DialTimeout("tcp", args[0], 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	var hdr [16]byte
	binary.BigEndian.PutUint64(hdr[0:], up)
	binary.BigEndian.PutUint64(hdr[8:], down)
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	say("CONNECTED")
	sent, recv := transfer(c.(*net.TCPConn), up, down, limit)
	say("DONE %d %d", sent, recv)
	return nil
}

// transfer sends sendN bytes and receives recvN bytes at once, printing
// progress, and returns the payload bytes moved each way.
func transfer(c *net.TCPConn, sendN, recvN uint64, limit time.Duration) (sent, recv uint64) {
	var nSent, nRecv atomic.Uint64
	if limit > 0 {
		c.SetDeadline(time.Now().Add(limit))
	}
	stop := make(chan struct{})
	ticker := time.NewTicker(50 * time.Millisecond)
	go func() {
		for {
			select {
			case <-ticker.C:
				say("P %d %d", nSent.Load(), nRecv.Load())
			case <-stop:
				return
			}
		}
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 64*1024)
		for left := sendN; left > 0; {
			n := uint64(len(buf))
			if left < n {
				n = left
			}
			w, err := c.Write(buf[:n])
			nSent.Add(uint64(w))
			if err != nil {
				return
			}
			if left != Infinite {
				left -= uint64(w)
			}
		}
		c.CloseWrite()
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 64*1024)
		for nRecv.Load() < recvN {
			r, err := c.Read(buf)
			nRecv.Add(uint64(r))
			if err != nil {
				return
			}
		}
	}()
	wg.Wait()
	close(stop)
	ticker.Stop()
	return nSent.Load(), nRecv.Load()
}

func udpEcho(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: udp-echo LISTEN")
	}
	c, err := net.ListenPacket("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	say("ADDR %s", c.LocalAddr())
	var sent, recv uint64
	buf := make([]byte, 64*1024)
	first := true
	for {
		if first {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
		} else {
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
		}
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			say("DONE %d %d", sent, recv)
			return nil
		}
		first = false
		recv += uint64(n)
		if w, err := c.WriteTo(buf[:n], from); err == nil {
			sent += uint64(w)
		}
	}
}

func udpClient(args []string) error {
	if len(args) != 3 {
		return errors.New("usage: udp-client ADDR COUNT SIZE")
	}
	count, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	size, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	var recv atomic.Uint64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64*1024)
		for {
			c.SetReadDeadline(time.Now().Add(time.Second))
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			recv.Add(uint64(n))
		}
	}()
	var sent uint64
	payload := make([]byte, size)
	for i := range count {
		if _, err := c.Write(payload); err != nil {
			return fmt.Errorf("datagram %d: %w", i, err)
		}
		sent += uint64(size)
		if i%16 == 15 {
			time.Sleep(time.Millisecond) // let the echo side keep up
		}
	}
	<-done
	say("DONE %d %d", sent, recv.Load())
	return nil
}
