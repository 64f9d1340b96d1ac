// For tls.cc and tls_link.cc only: the OpenSSL side of TlsContext.
#pragma once

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/link/tls.h"

namespace cairn {

struct TlsContext::Impl {
  // Links are made from it; OpenSSL's context is safe to share once set up.
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx{SSL_CTX_new(TLS_method()), &SSL_CTX_free};
};

// The names a certificate carries: the subject's CN, then its DNS and IP
// subjectAltNames (IPs as text), without duplicates.
std::vector<std::string> CertificateNames(X509* cert);

}  // namespace cairn
