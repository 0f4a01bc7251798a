"""Bytes that do not parse as the method's request message are answered INVALID_ARGUMENT, not INTERNAL.

grpc answers a request whose deserializer raises with INTERNAL ("Exception deserializing request!"), which
reads as a server bug. This interceptor makes the deserializer hand a marker to the method instead, and the
method answers INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import grpc


class Malformed:
    """What a client-streaming method receives for a message that does not parse: it answers that message with
    INVALID_ARGUMENT in band (a stream outlives one bad message)."""

    def __init__(self, error: Exception):
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service_names: list[str]):
        self._services = set(service_names)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.split("/")[1]  # "/package.Service/Method"
        if handler is None or service not in self._services or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        message = getattr(parse, "__qualname__", "request").split(".")[0]

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
                return Malformed(exc)

        async def refuse(context, request):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse as {message}: {request.error}"
            )

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, Malformed):
                    await refuse(context, request)
                return await inner(request, context)

            return handler._replace(request_deserializer=tolerant, unary_unary=unary)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, Malformed):
                    await refuse(context, request)
                async for item in inner_stream(request, context):
                    yield item

            return handler._replace(request_deserializer=tolerant, unary_stream=stream)
        if handler.stream_stream is not None:  # the method answers each Malformed message itself
            return handler._replace(request_deserializer=tolerant)
        return handler
