// Mutual TLS for the links between sites.
//
// Both ends present a certificate and check the other's against one CA:
// TLS 1.3 only, no session resumption, a peer without a certificate is
// refused in the handshake. Who a verified peer is comes from its
// certificate (TlsContext::Names): the subject's CN, then its DNS and IP
// subjectAltNames. What that peer may do is decided above the link (the
// sink's [peer NAME] grants, replication/peer_policy.h).
//
// Only tls.cc and tls_link.cc (the TLS link) see OpenSSL.
//
// Thread-safety: a loaded TlsContext is immutable and shared by every link.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/base/status.h"

namespace cairn {

struct TlsFiles {
  std::string ca;    // PEM: the CA every peer's certificate must chain to
  std::string cert;  // PEM: this end's certificate (then any intermediates)
  std::string key;   // PEM: its private key, unencrypted, readable by cairnd only
};

class TlsContext {
 public:
  // kInvalidArgument naming the file that is missing, unreadable or not
  // PEM, or a key that does not belong to the certificate.
  static StatusOr<std::shared_ptr<const TlsContext>> Load(const TlsFiles& files);
  ~TlsContext();

  // The names of this end's own certificate (for the log at start).
  const std::vector<std::string>& own_names() const { return own_names_; }

  struct Impl;  // the OpenSSL context (tls_impl.h)
  Impl& impl() const { return *impl_; }

 private:
  TlsContext(std::unique_ptr<Impl> impl, std::vector<std::string> own_names);
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> own_names_;
};

}  // namespace cairn
