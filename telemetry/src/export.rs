//! The OTLP exporter's HTTP client: plain HTTP/1.1 over hyper's pooled client, bounded in time
//! and in the size of what it reads back.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::{HttpClient, HttpError};

/// Time one export request to the collector may take, response included (OTLP's default).
pub(crate) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector response read; OTLP responses are a few bytes unless spans were refused.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The OTLP exporter's HTTP client.
///
/// The SDK's batch processor polls exports on its own thread with a plain executor, where there
/// is no Tokio reactor for hyper's sockets; so each request runs on a small runtime of the
/// exporter's own (one worker thread) and only its result crosses back. Being separate from the
/// serving runtime, a busy server never delays an export and a stuck collector never occupies a
/// server thread.
#[derive(Debug)]
pub(crate) struct ExportClient {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl ExportClient {
    /// A client whose requests run on `runtime`.
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        ExportClient { client, runtime }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let sent = self.runtime.spawn(async move {
            let exchange = async {
                let resp = client.request(request).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            tokio::time::timeout(EXPORT_TIMEOUT, exchange)
                .await
                .map_err(|_| HttpError::from("the OTLP collector did not answer in time"))?
        });
        sent.await?
    }
}
