//! gRPC server reflection, asked as a client would (for the tests that check it).

/// The services a gRPC server lists through reflection, asked once over
/// `grpc.reflection.v1` and once over `v1alpha` (older clients' version).
pub fn reflected_services(addr: &str) -> (Vec<String>, Vec<String>) {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};
    super::common::runtime().block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let req = v1::ServerReflectionRequest {
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
        let mut s = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"))
            .into_inner();
        let new = match s.next().await.unwrap().unwrap().message_response {
            Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => l.service,
            other => panic!("v1: {other:?}"),
        };
        let req = v1alpha::ServerReflectionRequest {
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
        let mut s = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"))
            .into_inner();
        let old = match s.next().await.unwrap().unwrap().message_response {
            Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => l.service,
            other => panic!("v1alpha: {other:?}"),
        };
        let names = |v: Vec<_>| v.into_iter().map(|s: v1::ServiceResponse| s.name).collect::<Vec<_>>();
        let old_names = old.into_iter().map(|s| s.name).collect::<Vec<_>>();
        (names(new), old_names)
    })
}
