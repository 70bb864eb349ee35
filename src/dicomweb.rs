//! A small blocking DICOMweb client (PS3.18): QIDO-RS to find ultrasound instances, WADO-RS to
//! retrieve them, STOW-RS to store derived objects back into their study.
//!
//! Every answer is bounded: a time limit per request, a byte limit per response, a limit on
//! the number of instances a query may list; a server that breaks them, answers with something
//! that is not what was asked, or refuses the credentials gets an error naming the server and
//! the problem ([`DicomWebError`]), never a panic or an unbounded allocation.

use std::time::Duration;

use serde_json::Value;

/// What went wrong talking to a DICOMweb server. Every variant names the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DicomWebError {
    /// The address is not a DICOMweb URL this client understands.
    #[error("{url}: not a DICOMweb address: {reason}")]
    BadUrl {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached (refused, no route, name unknown, timed out).
    #[error("{server}: unreachable: {reason}")]
    Unreachable {
        /// The server's base URL.
        server: String,
        /// The transport's error.
        reason: String,
    },
    /// The server refused the credentials (HTTP 401 or 403).
    #[error("{server}: authentication refused (HTTP {status}) for {what}")]
    Auth {
        /// The server's base URL.
        server: String,
        /// The HTTP status.
        status: u16,
        /// The request.
        what: String,
    },
    /// The server answered with an error status.
    #[error("{server}: {what}: HTTP {status} {reason}")]
    Status {
        /// The server's base URL.
        server: String,
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body, for people.
        reason: String,
    },
    /// The answer is not what DICOMweb promises (bad JSON, bad multipart, too large).
    #[error("{server}: {what}: {reason}")]
    BadAnswer {
        /// The server's base URL.
        server: String,
        /// The request.
        what: String,
        /// What is wrong with the answer.
        reason: String,
    },
}

/// Credentials sent with every request.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Auth {
    /// None.
    #[default]
    None,
    /// HTTP Basic authentication.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A bearer token (OAuth 2).
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    // Never print a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

impl Auth {
    fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Basic { user, password } => Some(format!(
                "Basic {}",
                base64(format!("{user}:{password}").as_bytes())
            )),
            Auth::Bearer(token) => Some(format!("Bearer {token}")),
        }
    }
}

/// Standard base64 (RFC 4648) of `bytes`, with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Limits on what the client accepts from a server.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Limits {
    /// Time allowed for one request, start to end.
    pub timeout: Duration,
    /// Largest response body accepted, bytes.
    pub max_response_bytes: u64,
    /// Most instances one query may list.
    pub max_instances: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            timeout: Duration::from_secs(120),
            max_response_bytes: 2 << 30,
            max_instances: 100_000,
        }
    }
}

/// One instance found by a query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct InstanceRef {
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
    /// SOP Instance UID.
    pub instance: String,
    /// Series Description, when the server reports it (sonoguide's derived series start with
    /// "sonoguide overlay" or "sonoguide segmentation").
    pub series_description: Option<String>,
    /// Modality of the series, when the server reports it.
    pub modality: Option<String>,
}

/// What to look for.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Query {
    /// Only this study.
    pub study: Option<String>,
    /// Only studies from this date on (YYYYMMDD).
    pub since: Option<String>,
    /// Only this modality (e.g. `US`).
    pub modality: Option<String>,
}

/// A DICOMweb server.
#[derive(Debug, Clone)]
pub struct DicomWebClient {
    base: String,
    agent: ureq::Agent,
    auth: Auth,
    limits: Limits,
}

/// Page size of QIDO-RS queries.
const PAGE: usize = 500;

impl InstanceRef {
    /// An instance named by its UIDs (what a query returned, or what a caller knows).
    pub fn new(study: &str, series: &str, instance: &str) -> InstanceRef {
        InstanceRef {
            study: study.to_string(),
            series: series.to_string(),
            instance: instance.to_string(),
            series_description: None,
            modality: None,
        }
    }

    /// Whether this is one of sonoguide's derived objects (never processed again).
    pub fn is_sonoguide_output(&self) -> bool {
        self.series_description.as_deref().is_some_and(|d| {
            d.starts_with(crate::dicom::write::OVERLAY_SERIES)
                || d.starts_with(crate::dicom::write::SEG_SERIES)
        })
    }
}

impl DicomWebClient {
    /// A client for `url`: `dicomweb+http://HOST/ROOT`, `dicomweb+https://…`, or a plain
    /// `http(s)://` URL of the DICOMweb root.
    pub fn new(url: &str, auth: Auth, limits: Limits) -> Result<DicomWebClient, DicomWebError> {
        let bad = |reason: &str| DicomWebError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let plain = url.strip_prefix("dicomweb+").unwrap_or(url);
        let rest = plain
            .strip_prefix("http://")
            .or_else(|| plain.strip_prefix("https://"))
            .ok_or_else(|| {
                bad("it must start with dicomweb+http://, dicomweb+https://, http:// or https://")
            })?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(bad("no host"));
        }
        if plain.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it holds spaces or control characters"));
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(limits.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build();
        Ok(DicomWebClient {
            base: plain.trim_end_matches('/').to_string(),
            agent: config.into(),
            auth,
            limits,
        })
    }

    /// Whether `s` is meant as a DICOMweb server rather than a file (`dicomweb+…`; whether
    /// the rest is usable is [`DicomWebClient::new`]'s to say).
    pub fn is_url(s: &str) -> bool {
        s.starts_with("dicomweb+")
    }

    /// The server's base URL (the DICOMweb root).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        accept: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<(String, Vec<u8>), DicomWebError> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {path}");
        let mut req = match method {
            "POST" => ureq::http::Request::post(&url),
            _ => ureq::http::Request::get(&url),
        }
        .header("Accept", accept);
        if let Some(h) = self.auth.header() {
            req = req.header("Authorization", h);
        }
        let result = match body {
            Some((content_type, bytes)) => {
                let req = req
                    .header("Content-Type", content_type)
                    .body(bytes.to_vec())
                    .map_err(|e| self.bad(&what, e.to_string()))?;
                self.agent.run(req)
            }
            None => {
                let req = req.body(()).map_err(|e| self.bad(&what, e.to_string()))?;
                self.agent.run(req)
            }
        };
        let mut response = result.map_err(|e| DicomWebError::Unreachable {
            server: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(self.limits.max_response_bytes)
            .read_to_vec()
            .map_err(|e| {
                self.bad(
                    &what,
                    format!(
                        "reading the answer (limit {} bytes): {e}",
                        self.limits.max_response_bytes
                    ),
                )
            })?;
        match status {
            200..=299 => Ok((content_type, bytes)),
            401 | 403 => Err(DicomWebError::Auth {
                server: self.base.clone(),
                status,
                what,
            }),
            _ => Err(DicomWebError::Status {
                server: self.base.clone(),
                what,
                status,
                reason: String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                    .trim()
                    .to_string(),
            }),
        }
    }

    fn bad(&self, what: &str, reason: String) -> DicomWebError {
        DicomWebError::BadAnswer {
            server: self.base.clone(),
            what: what.to_string(),
            reason,
        }
    }

    /// QIDO-RS: the instances matching `query`, in the server's order, paged, at most
    /// `Limits::max_instances`.
    pub fn search_instances(&self, query: &Query) -> Result<Vec<InstanceRef>, DicomWebError> {
        let mut filters = Vec::new();
        if let Some(s) = &query.study {
            filters.push(format!("StudyInstanceUID={}", encode(s)));
        }
        if let Some(d) = &query.since {
            filters.push(format!("StudyDate={}-", encode(d)));
        }
        if let Some(m) = &query.modality {
            filters.push(format!("Modality={}", encode(m)));
        }
        // Series Description (0008,103E) and Modality (0008,0060) are asked for explicitly: not
        // every server returns them at instance level by default.
        filters.push("includefield=0008103E".into());
        filters.push("includefield=00080060".into());
        let mut found = Vec::new();
        let mut offset = 0;
        loop {
            let path = format!(
                "/instances?{}&limit={PAGE}&offset={offset}",
                filters.join("&")
            );
            let (_, bytes) = self.request("GET", &path, "application/dicom+json", None)?;
            let what = format!("GET {path}");
            // An empty body is an empty result (204 No Content).
            let items: Vec<Value> = if bytes.iter().all(u8::is_ascii_whitespace) {
                Vec::new()
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| self.bad(&what, format!("not a DICOM JSON array: {e}")))?
            };
            let n = items.len();
            for item in items {
                let field = |tag: &str| {
                    item.get(tag)
                        .and_then(|v| v.get("Value"))
                        .and_then(|v| v.get(0))
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                };
                match (field("0020000D"), field("0020000E"), field("00080018")) {
                    (Some(study), Some(series), Some(instance)) => found.push(InstanceRef {
                        study,
                        series,
                        instance,
                        series_description: field("0008103E"),
                        modality: field("00080060"),
                    }),
                    _ => {
                        return Err(self.bad(
                            &what,
                            "an instance without Study, Series or SOP Instance UID".into(),
                        ))
                    }
                }
                if found.len() > self.limits.max_instances {
                    return Err(self.bad(
                        &what,
                        format!("more than {} instances", self.limits.max_instances),
                    ));
                }
            }
            if n < PAGE {
                break;
            }
            offset += n;
        }
        Ok(found)
    }

    /// WADO-RS: the instance's DICOM file (Part 10 bytes), in whatever transfer syntax the
    /// server holds it.
    pub fn retrieve_instance(&self, r: &InstanceRef) -> Result<Vec<u8>, DicomWebError> {
        let path = format!(
            "/studies/{}/series/{}/instances/{}",
            encode(&r.study),
            encode(&r.series),
            encode(&r.instance)
        );
        let (content_type, bytes) = self.request(
            "GET",
            &path,
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            None,
        )?;
        let what = format!("GET {path}");
        let mut parts = multipart_parts(&content_type, &bytes).map_err(|e| self.bad(&what, e))?;
        if parts.len() != 1 {
            return Err(self.bad(
                &what,
                format!("{} parts where one instance was asked for", parts.len()),
            ));
        }
        let part = parts.remove(0);
        if part.len() < 132 || &part[128..132] != b"DICM" {
            return Err(self.bad(&what, "the part is not a DICOM file".into()));
        }
        Ok(part)
    }

    /// STOW-RS: stores `files` (Part 10 bytes) into `study`; the SOP Instance UIDs the server
    /// says it stored, or an error naming what it refused.
    pub fn store(&self, study: &str, files: &[Vec<u8>]) -> Result<usize, DicomWebError> {
        let boundary = format!("sonoguide-{}", crate::dicom::write::new_uid());
        let mut body = Vec::new();
        for f in files {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(f);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let path = format!("/studies/{}", encode(study));
        let content_type =
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
        let (_, answer) = self.request(
            "POST",
            &path,
            "application/dicom+json",
            Some((&content_type, &body)),
        )?;
        let what = format!("POST {path}");
        let json: Value = serde_json::from_slice(&answer)
            .map_err(|e| self.bad(&what, format!("the store response is not JSON: {e}")))?;
        // Failed SOP Sequence (0008,1198): any item is a refusal.
        let failed = json
            .get("00081198")
            .and_then(|v| v.get("Value"))
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len);
        if failed > 0 {
            return Err(self.bad(
                &what,
                format!("{failed} of {} object(s) refused", files.len()),
            ));
        }
        let stored = json
            .get("00081199")
            .and_then(|v| v.get("Value"))
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len);
        if stored != files.len() {
            return Err(self.bad(
                &what,
                format!("{stored} of {} object(s) acknowledged", files.len()),
            ));
        }
        Ok(stored)
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bodies of a `multipart/related` message (RFC 2046): split at the boundary named in
/// `content_type`, each part's headers removed.
pub fn multipart_parts(content_type: &str, body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/related")
    {
        return Err(format!(
            "content type {content_type:?}, not multipart/related"
        ));
    }
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or("no boundary in the content type")?;
    let delimiter = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut pos = find(body, &delimiter, 0).ok_or("no boundary in the body")?;
    loop {
        let after = pos + delimiter.len();
        if body[after..].starts_with(b"--") {
            break;
        }
        // Headers end at the first empty line.
        let headers_end = find(body, b"\r\n\r\n", after).ok_or("a part without headers")? + 4;
        let next = find(body, &[b"\r\n", delimiter.as_slice()].concat(), headers_end)
            .ok_or("a part without its closing boundary")?;
        parts.push(body[headers_end..next].to_vec());
        pos = next + 2;
    }
    Ok(parts)
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > haystack.len() || needle.is_empty() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_examples() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn multipart_splits_binary_parts() {
        let body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nAB\r\n--b\r\nCD\r\n--b1\r\nContent-Type: application/dicom\r\n\r\n\x00\x01\r\n--b1--\r\n";
        let parts = multipart_parts(
            "multipart/related; type=\"application/dicom\"; boundary=b1",
            body,
        )
        .unwrap();
        assert_eq!(parts, vec![b"AB\r\n--b\r\nCD".to_vec(), vec![0, 1]]);
        assert!(multipart_parts("application/json", body).is_err());
        assert!(multipart_parts("multipart/related; boundary=zz", body).is_err());
        // Truncated: no closing boundary.
        assert!(multipart_parts("multipart/related; boundary=b1", &body[..50]).is_err());
    }

    #[test]
    fn urls_are_checked() {
        let ok = DicomWebClient::new(
            "dicomweb+http://127.0.0.1:8042/dicom-web/",
            Auth::None,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(ok.base(), "http://127.0.0.1:8042/dicom-web");
        for bad in ["ftp://x", "dicomweb+http://", "http:///x", "http://a b"] {
            assert!(
                DicomWebClient::new(bad, Auth::None, Limits::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_are_never_printed() {
        let a = Auth::Basic {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert!(!format!("{:?}", Auth::Bearer("tok".into())).contains("tok"));
    }
}
