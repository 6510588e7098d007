//! Reading a TLS ClientHello off a guest connection without consuming it: every byte read is
//! recorded so it can be replayed to the upstream (splice) or to our own TLS server (MITM).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest ClientHello (all records) we accept.
pub const MAX_HELLO: usize = 32 * 1024;

#[derive(Debug)]
pub struct Hello {
    /// Every byte read from the client so far.
    pub recorded: Vec<u8>,
    /// The SNI host name, lowercased, if it is a DNS name (rustls ignores IP-literal SNI).
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

/// Feeds bytes to a rustls [`rustls::server::Acceptor`] until it has a whole ClientHello,
/// however the client split it over TCP segments and TLS records.
#[derive(Default)]
pub struct HelloParser {
    acceptor: rustls::server::Acceptor,
    pub recorded: Vec<u8>,
}

impl HelloParser {
    /// `Ok(None)`: need more bytes.
    pub fn push(&mut self, mut data: &[u8]) -> io::Result<Option<Hello>> {
        self.recorded.extend_from_slice(data);
        if self.recorded.len() > MAX_HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "ClientHello too large"));
        }
        while !data.is_empty() {
            let n = self.acceptor.read_tls(&mut data)?;
            if n == 0 {
                break;
            }
        }
        match self.acceptor.accept() {
            Ok(None) => Ok(None),
            Ok(Some(accepted)) => {
                let ch = accepted.client_hello();
                let sni = ch.server_name().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
                let alpn = ch.alpn().map(|it| it.map(|p| p.to_vec()).collect()).unwrap_or_default();
                Ok(Some(Hello { recorded: std::mem::take(&mut self.recorded), sni, alpn }))
            }
            Err((e, _)) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Reads until a complete ClientHello has arrived (the caller applies the deadline).
pub async fn read_client_hello<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Hello> {
    let mut parser = HelloParser::default();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(h) = parser.push(&buf[..n])? {
            return Ok(h);
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    pub inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frames the handshake payload of one record into records of at most `chunk` bytes.
    fn refragment(rec: &[u8], chunk: usize) -> Vec<u8> {
        assert_eq!(rec[0], 22);
        let len = u16::from_be_bytes([rec[3], rec[4]]) as usize;
        assert_eq!(rec.len(), 5 + len, "one record");
        let mut out = Vec::new();
        for part in rec[5..].chunks(chunk) {
            out.extend_from_slice(&[22, rec[1], rec[2]]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn every_split_point() {
        let ch = client_hello("Api.Example.com", &[b"h2", b"http/1.1"]);
        assert!(ch.len() > 200);
        for split in 0..=ch.len() {
            let mut p = HelloParser::default();
            let first = p.push(&ch[..split]).unwrap();
            let h = match first {
                Some(h) => {
                    assert_eq!(split, ch.len(), "complete only with all bytes");
                    h
                }
                None => p.push(&ch[split..]).unwrap().expect("complete"),
            };
            assert_eq!(h.sni.as_deref(), Some("api.example.com"));
            assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
            assert_eq!(h.recorded, ch);
        }
    }

    #[test]
    fn across_records_and_byte_by_byte() {
        let ch = client_hello("multi.example.org", &[]);
        for chunk in [1usize, 7, 100, 511] {
            let framed = refragment(&ch, chunk);
            let mut p = HelloParser::default();
            let mut got = None;
            for (i, b) in framed.iter().enumerate() {
                if let Some(h) = p.push(std::slice::from_ref(b)).unwrap() {
                    assert_eq!(i, framed.len() - 1);
                    got = Some(h);
                }
            }
            let h = got.expect("hello");
            assert_eq!(h.sni.as_deref(), Some("multi.example.org"));
            assert!(h.alpn.is_empty());
            assert_eq!(h.recorded, framed);
        }
    }

    #[test]
    fn no_sni_and_garbage() {
        // An IP-literal server name is not sent as SNI by rustls.
        let ch = client_hello("203.0.113.5", &[]);
        let h = HelloParser::default().push(&ch).unwrap().unwrap();
        assert_eq!(h.sni, None);
        assert!(HelloParser::default().push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
        let mut p = HelloParser::default();
        let big = refragment(&ch, 1);
        let mut err = false;
        // Endless tiny records never complete; the size cap ends it.
        for _ in 0..(MAX_HELLO / 6 + 2) {
            match p.push(&big[..6]) {
                Ok(_) => {}
                Err(_) => {
                    err = true;
                    break;
                }
            }
        }
        assert!(err);
    }

    #[tokio::test]
    async fn async_reader_and_prefixed() {
        let ch = client_hello("a.example", &[]);
        let (mut a, mut b) = tokio::io::duplex(64);
        let data = ch.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in data.chunks(13) {
                a.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
            a.write_all(b"tail").await.unwrap();
        });
        let h = read_client_hello(&mut b).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("a.example"));
        let mut p = Prefixed::new(h.recorded.clone(), b);
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.unwrap();
        let mut want = ch.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(all, want);
    }
}
