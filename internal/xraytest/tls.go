package xraytest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/myvpn/bwagent/xraystats"
)

// Vision is the flow of XTLS Vision ("flow": "xtls-rprx-vision"), for
// [xraystats.VLESS] accounts. An inbound with a user that has a flow is a
// TLS inbound: see [StartServer].
const Vision = "xtls-rprx-vision"

// VisionInbound is the inbound tag that [NewVisionUser] gives its users.
const VisionInbound = "vision-in"

// TLSServerName is the name in the certificates of the server's TLS
// inbounds and of the HTTPS origin, which clients ask for (SNI).
const TLSServerName = "localhost"

// NewVisionUser returns a VLESS user of the inbound [VisionInbound] with a
// fresh random account whose flow is [Vision]: the server's inbound for it
// is VLESS over TLS, and the user's client pins the server's certificate.
func NewVisionUser(email string) User {
	u := NewUser(email, VLESS)
	u.Inbound = VisionInbound
	u.Account = xraystats.VLESS{ID: NewUUID(), Flow: Vision}
	return u
}

// selfSigned is a self-signed certificate for [TLSServerName] and
// 127.0.0.1, and its key, written as PEM files.
type selfSigned struct {
	certFile, keyFile string
	cert              tls.Certificate
	leaf              *x509.Certificate
	// sha256 is the hex SHA-256 of the certificate's DER, as Xray's
	// pinnedPeerCertSha256 takes it (transport/internet/tls/pin.go).
	sha256 string
}

// newSelfSigned makes a self-signed ECDSA P-256 certificate valid for a
// day, and writes it and its key to dir as name.crt and name.key.
func newSelfSigned(t testing.TB, dir, name string) *selfSigned {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: TLSServerName, Organization: []string{"xraytest " + name}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{TLSServerName},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	s := &selfSigned{
		certFile: filepath.Join(dir, name+".crt"),
		keyFile:  filepath.Join(dir, name+".key"),
		cert:     tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
		leaf:     leaf,
	}
	sum := sha256.Sum256(der)
	s.sha256 = hex.EncodeToString(sum[:])
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	if err := os.WriteFile(s.certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// pool is a certificate pool that trusts only s.
func (s *selfSigned) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(s.leaf)
	return p
}
