// For tls.cc and tcp_link.cc only: the OpenSSL side of TlsContext.
#pragma once

#include <openssl/x509.h>

#include <boost/asio/ssl/context.hpp>
#include <string>
#include <vector>

#include "engine/link/tls.h"

namespace cairn {

struct TlsContext::Impl {
  // Streams are made from it; OpenSSL's context is safe to share once set up.
  mutable boost::asio::ssl::context ctx{boost::asio::ssl::context::tls};
};

// The names a certificate carries: the subject's CN, then its DNS and IP
// subjectAltNames (IPs as text), without duplicates.
std::vector<std::string> CertificateNames(X509* cert);

}  // namespace cairn
