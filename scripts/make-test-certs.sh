#!/usr/bin/env bash
# Test certificates for Ferry's mutual TLS (and QEMU's tls-creds-x509), made with openssl.
#
#   scripts/make-test-certs.sh OUTDIR
#
# OUTDIR/source/{ca.pem,cert.pem,key.pem}       source side: the CA, its own cert and key
# OUTDIR/destination/{ca.pem,cert.pem,key.pem}  destination side, same CA
# OUTDIR/other-ca/{ca.pem,cert.pem,key.pem}     trusts the Ferry CA, but its own cert was
#                                               signed by an unrelated CA (other-ca/signer.pem)
# OUTDIR/qemu/{ca-cert,server-cert,server-key,client-cert,client-key}.pem  same CA as
#                                               source/destination, for -object tls-creds-x509,dir=
#
# Keys are ECDSA P-256 in PKCS#8 PEM (mode 0600). Leaf certs carry serverAuth and clientAuth,
# so either side can present them, and subjectAltNames for localhost, 127.0.0.1 and the
# bench's veth addresses 10.77.0.1/10.77.0.2. Valid for 10 years. Prints nothing but errors.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1
days=3650
ips="IP:127.0.0.1,IP:10.77.0.1,IP:10.77.0.2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077 # keys are born private; certificates are chmod 0644 below

# new_key FILE: an ECDSA P-256 key in PKCS#8 PEM.
new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# new_ca DIR NAME: DIR/ca.pem and DIR/ca-key.pem, a self-signed CA.
new_ca() {
    new_key "$1/ca-key.pem"
    openssl req -new -x509 -key "$1/ca-key.pem" -out "$1/ca.pem" -days "$days" \
        -subj "/O=Ferry test/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
}

# new_leaf CADIR CERT KEY CN SAN: a leaf key and a certificate signed by CADIR's CA.
new_leaf() {
    new_key "$3"
    cat >"$tmp/ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$5
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
    openssl req -new -key "$3" -subj "/O=Ferry test/CN=$4" -out "$tmp/csr"
    openssl x509 -req -in "$tmp/csr" -CA "$1/ca.pem" -CAkey "$1/ca-key.pem" \
        -CAcreateserial -CAserial "$tmp/serial" -days "$days" -extfile "$tmp/ext" \
        -out "$2" 2>/dev/null
    openssl verify -CAfile "$1/ca.pem" "$2" >/dev/null
}

mkdir -p "$out"/{source,destination,other-ca,qemu}
ca="$tmp/ca" other="$tmp/other"
mkdir -p "$ca" "$other"
new_ca "$ca" "Ferry test CA"
new_ca "$other" "Unrelated test CA"

src_san="DNS:localhost,DNS:ferry-source,$ips"
dst_san="DNS:localhost,DNS:ferry-destination,$ips"
new_leaf "$ca" "$out/source/cert.pem" "$out/source/key.pem" ferry-source "$src_san"
new_leaf "$ca" "$out/destination/cert.pem" "$out/destination/key.pem" ferry-destination "$dst_san"
new_leaf "$other" "$out/other-ca/cert.pem" "$out/other-ca/key.pem" ferry-source "$src_san"
cp "$ca/ca.pem" "$out/source/ca.pem"
cp "$ca/ca.pem" "$out/destination/ca.pem"
cp "$ca/ca.pem" "$out/other-ca/ca.pem"
cp "$other/ca.pem" "$out/other-ca/signer.pem"

q="$out/qemu"
cp "$ca/ca.pem" "$q/ca-cert.pem"
new_leaf "$ca" "$q/server-cert.pem" "$q/server-key.pem" ferry-destination "$dst_san"
new_leaf "$ca" "$q/client-cert.pem" "$q/client-key.pem" ferry-source "$src_san"

chmod 0644 "$out"/other-ca/signer.pem "$out"/*/ca.pem "$out"/*/cert.pem "$q"/*-cert.pem
chmod 0600 "$out"/*/key.pem "$q"/*-key.pem
chmod 0755 "$out" "$out"/*
