//! A scripted HTTP/2 server that writes its own frames, for the failure modes real servers produce only by
//! chance: a GOAWAY whose last stream id is below a stream the client already sent, RST_STREAM with
//! REFUSED_STREAM, or a reset after the request was read. Every other request gets a gRPC answer whose message is
//! the server's address (what [`crate::load::call`] checks).
//!
//! It speaks just enough HTTP/2 for one client: SETTINGS and PING are acknowledged, request headers are not
//! decoded (only stream ids and END_STREAM matter), and responses use literal HPACK fields.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does with one request, chosen when the request has been read in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// A gRPC answer with status OK.
    Answer,
    /// RST_STREAM REFUSED_STREAM: the server did no work on it.
    Refuse,
    /// GOAWAY NO_ERROR naming the previous stream as the last one processed, so this one is refused; then the
    /// connection closes.
    GoAway,
    /// RST_STREAM INTERNAL_ERROR after reading the request: it reached the server and may have been processed.
    Reset,
}

type Script = Box<dyn FnMut(u64) -> Act + Send>;

/// A running scripted server; stops when dropped.
pub struct ScriptedServer {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedServer {
    /// Starts on 127.0.0.1; `script(n)` decides the fate of the server's `n`th request (from 0, over all
    /// connections).
    pub async fn start(script: impl FnMut(u64) -> Act + Send + 'static) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (requests, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(script)));
        let (r, a) = (requests.clone(), answered.clone());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (script, r, a) = (script.clone(), r.clone(), a.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, addr, script, r, a).await;
                });
            }
        });
        Ok(Self { addr, requests, answered, task })
    }

    /// Requests read in full so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests answered with OK so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;
const ACK: u8 = 1;
const END_HEADERS: u8 = 4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK literal field without indexing, new name (RFC 7541 §6.2.2); short names and values only.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn answer(stream: u32, reply: &[u8]) -> Vec<u8> {
    // :status 200 is index 8 of the static table.
    let mut head = vec![0x88];
    literal(&mut head, "content-type", "application/grpc");
    let mut message = vec![0];
    message.extend_from_slice(&(reply.len() as u32).to_be_bytes());
    message.extend_from_slice(reply);
    let mut trailers = Vec::new();
    literal(&mut trailers, "grpc-status", "0");
    let mut out = frame(HEADERS, END_HEADERS, stream, &head);
    out.extend(frame(DATA, 0, stream, &message));
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &trailers));
    out
}

async fn serve(
    mut socket: TcpStream,
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    requests: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    socket.read_exact(&mut preface).await?;
    socket.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let reply = addr.to_string();
    let mut last_answered = 0u32;
    loop {
        let mut header = [0u8; 9];
        socket.read_exact(&mut header).await?;
        let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        socket.read_exact(&mut payload).await?;
        match kind {
            SETTINGS if flags & ACK == 0 => socket.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if flags & ACK == 0 => socket.write_all(&frame(PING, ACK, 0, &payload)).await?,
            HEADERS | DATA if flags & END_STREAM != 0 => {
                let n = requests.fetch_add(1, Ordering::SeqCst);
                let act = (script.lock().unwrap_or_else(|e| e.into_inner()))(n);
                match act {
                    Act::Answer => {
                        socket.write_all(&answer(stream, reply.as_bytes())).await?;
                        answered.fetch_add(1, Ordering::SeqCst);
                        last_answered = stream;
                    }
                    Act::Refuse => socket.write_all(&frame(RST_STREAM, 0, stream, &7u32.to_be_bytes())).await?,
                    Act::Reset => socket.write_all(&frame(RST_STREAM, 0, stream, &2u32.to_be_bytes())).await?,
                    Act::GoAway => {
                        let mut body = last_answered.to_be_bytes().to_vec();
                        body.extend_from_slice(&0u32.to_be_bytes());
                        socket.write_all(&frame(GOAWAY, 0, 0, &body)).await?;
                        // Give the client time to read it before the connection closes.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        return Ok(());
                    }
                }
            }
            _ => {}
        }
    }
}
