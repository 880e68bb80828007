"""The benchmark's peer plumbing, without the peers installed: arguments, the 'not installed'
messages, the requests as llama-server chat JSON, its SSE chunks as streams, the OpenVINO
runner's records, the checkpoint split for llama.cpp's CLIP converter, and the tables."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest

from llava_serve.tools import peers
from llava_serve.tools.bench import parse_args
from llava_serve.tools.bench_client import LevelSummary, StreamResult, token_gaps
from llava_serve.tools.bench_report import ratio_table, ratios
from llava_serve.tools.bench_workload import SYSTEM, make_requests
from llava_serve.tools.peers import llamacpp, openvino
from llava_serve.tools.peers.layout import classic_name
from llava_serve.tools.peers.openai_stream import chat_body, read_chunk, stream_chat


def test_without_peers_the_bench_parses_as_before() -> None:
    args = parse_args(["--concurrency", "1,16"])
    assert args.peer_list == [] and args.engine_list == ["batch", "generate"]
    assert peers.missing(args) == []
    assert "--peer openvino" in peers.HOW_TO_ADD and "--llama-server" in peers.HOW_TO_ADD


def test_peer_names_and_variants_are_split(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--peer", "openvino, llama.cpp", "--llama-variants", "q8_0", "--engines", "none"])
    assert args.peer_list == ["openvino", "llama.cpp"] and args.llama_variants == ["q8_0"]
    assert args.openvino_variants == ["f32", "int8"] and args.engine_list == []
    assert peers.split_variant("f32@1", 2) == ("f32", 1) and peers.split_variant("q8_0", 2) == ("q8_0", 2)
    with pytest.raises(SystemExit):
        parse_args(["--peer", "vllm"])
    assert "unknown vllm" in capsys.readouterr().err


def test_missing_peers_say_how_to_add_them(tmp_path: Path) -> None:
    args = parse_args(["--peer", "openvino,llama.cpp", "--peer-dir", str(tmp_path)])
    args.openvino_python = str(tmp_path / "no-python")
    lines = peers.missing(args)
    assert any("--peer openvino" in line and "pip install -e .[peers]" in line for line in lines)
    assert any("--peer llama.cpp" in line and "--llama-server PATH" in line for line in lines)
    args.llama_server = tmp_path / "llama-server"
    assert "not an executable file" in str(llamacpp.missing(args))


def test_a_bench_request_as_llama_server_chat_json() -> None:
    request = make_requests(1, round_id=3)[0]
    body = chat_body(request, 128)
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM}
    image, text = user["content"]
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == request.image_png
    assert text == {"type": "text", "text": "\n" + request.question}
    assert request.prompt.endswith(request.question + " ASSISTANT:")
    assert body["max_tokens"] == 128 and body["temperature"] == 0.0 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    json.dumps(body)  # plain JSON


def chunk(content: str | None = None, predicted: int | None = None, finish: str | None = None) -> dict:
    out: dict = {"choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}
    if predicted is not None:
        out["timings"] = {"predicted_n": predicted}
    return out


def test_sse_chunks_count_tokens_from_the_servers_timings() -> None:
    result = StreamResult(start=0.0)
    read_chunk(result, chunk(predicted=0), 0.5)  # the role-only first chunk is no token
    read_chunk(result, chunk("a", 1), 1.0)
    read_chunk(result, chunk("b", 2), 1.1)
    read_chunk(result, chunk("東", 5), 1.4)  # three tokens held back for one character
    read_chunk(result, chunk(finish="length"), 1.4)
    read_chunk(result, {"choices": [], "usage": {"completion_tokens": 5}}, 1.4)
    assert result.frame_tokens == [1, 2, 5] and result.completion_tokens == 5
    assert result.finish_reason == "length"
    assert token_gaps(result) == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_stream_chat_reads_a_streamed_answer_and_an_error() -> None:
    events = [chunk("x", 1), chunk("y", 2), chunk(finish="length"), {"choices": [], "usage": {"completion_tokens": 2}}]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["max_tokens"] == 0:
            return httpx.Response(400, json={"error": {"message": "bad"}})
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    async def go() -> tuple[StreamResult, StreamResult]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            request = make_requests(1)[0]
            ok = await stream_chat(client, "http://peer/v1/chat/completions", chat_body(request, 2))
            bad = await stream_chat(client, "http://peer/v1/chat/completions", chat_body(request, 0))
            return ok, bad

    ok, bad = asyncio.run(go())
    assert ok.error is None and ok.completion_tokens == 2 and ok.frame_tokens == [1, 2]
    assert bad.error is not None and bad.error.startswith("HTTP 400")


def test_openvino_runner_records_become_stream_results() -> None:
    record = {"end": 2.0, "completion_tokens": 4, "frame_times": [0.5, 0.6, 0.8], "frame_tokens": [1, 2, 4]}
    result = openvino.as_stream_result({**record, "finish_reason": "length"}, 4)
    assert result.error is None and token_gaps(result) == pytest.approx([0.1, 0.1, 0.1])
    short = openvino.as_stream_result({**record, "finish_reason": None, "status": "DROPPED_BY_PIPELINE"}, 8)
    assert short.error is not None and "4 of 8" in short.error


def test_the_classic_layout_renames_the_clip_tower_only() -> None:
    assert classic_name("vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    classic = "vision_tower.vision_model.pre_layrnorm.weight"
    assert classic_name(classic) == classic
    assert classic_name("language_model.model.norm.weight") == "language_model.model.norm.weight"


def test_split_vision_gives_a_clip_folder_and_a_projector(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from llava_serve.tools.peers.layout import classic_copy
    from llava_serve.tools.peers.llamacpp_convert import split_vision

    model = tmp_path / "model"
    model.mkdir()
    weights = {
        "vision_tower.embeddings.class_embedding": torch.zeros(4),
        "multi_modal_projector.linear_1.weight": torch.zeros(2, 4),
        "language_model.model.norm.weight": torch.zeros(2),
    }
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"vision_config": {"hidden_size": 4}}))
    vision, projector = split_vision(classic_copy(model, tmp_path / "classic"), tmp_path / "split")
    assert json.loads((vision / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
    from safetensors.torch import load_file

    assert list(load_file(vision / "model.safetensors")) == ["vision_model.embeddings.class_embedding"]
    assert list(torch.load(projector)) == ["multi_modal_projector.linear_1.weight"]


def row(engine: str, n: int, tps: float) -> LevelSummary:
    return LevelSummary(engine, n, 128, n, 0, 1.0, int(tps), tps, n, 0.1, 0.2, 10, 20, 10, 1.0, 100, 0.0, 0, None)


def test_the_ratio_table_puts_each_peer_beside_llava_serve() -> None:
    rows = [row("batch", 16, 150.0), row("generate", 16, 25.0), row("openvino-f32", 16, 300.0)]
    rows.append(row("llama.cpp-q8_0", 16, 100.0))
    table = ratio_table(rows)
    assert "openvino-f32 tok/s | batch / openvino-f32" in table and "batch / llama.cpp-q8_0" in table
    assert "| 300.0 | 0.50 |" in table and "| 100.0 | 1.50 |" in table
    (level,) = ratios(rows)
    assert level["batch_over_openvino-f32"] == pytest.approx(0.5) and level["batch_over_generate"] == 6.0


def test_the_ratio_table_shows_every_engine_of_the_run_not_only_peers() -> None:
    rows = [row("batch", 1, 20.0), row("batch:bfloat16", 1, 33.0), row("openvino-f32", 1, 40.0)]
    head = ratio_table(rows).splitlines()[0]
    assert head.index("batch:bfloat16 tok/s") < head.index("openvino-f32 tok/s")  # worker specs, then peers
    assert "| 33.0 | 0.61 |" in ratio_table(rows)


def test_the_like_for_like_table_pairs_engines_by_weight_precision() -> None:
    """batch (f32) with the f32 peers, batch:int8 with openvino-int8 and llama.cpp-q8_0, batch:int4
    with q4_0; engines of no precision class (bfloat16, generate) and peers without a partner are left out."""
    from llava_serve.tools.bench_report import like_for_like_table, precision

    assert [precision(e) for e in ("batch", "batch:int4@1", "llama.cpp-q4_0", "openvino-int8@2", "generate")] == [
        "f32",
        "int4",
        "int4",
        "int8",
        None,
    ]
    rows = [row("batch", 1, 40.0), row("batch:int4", 1, 140.0), row("batch:bfloat16", 1, 70.0)]
    rows += [row("openvino-f32", 1, 32.0), row("llama.cpp-q4_0", 1, 70.0), row("openvino-int8", 1, 72.0)]
    lines = like_for_like_table(rows).splitlines()[2:]
    assert lines == [
        "| 1 | f32 | batch | 40.0 | openvino-f32 | 32.0 | 1.25 |",
        "| 1 | int4 | batch:int4 | 140.0 | llama.cpp-q4_0 | 70.0 | 2.00 |",
    ]
    assert like_for_like_table([row("batch", 1, 40.0), row("generate", 1, 20.0)]) == ""


def test_openvino_ir_gets_the_flat_preprocessor_config(tmp_path: Path) -> None:
    """OpenVINO GenAI reads preprocessor_config.json only; transformers 5 nests it in processor_config.json."""
    import json

    from llava_serve.tools.peers.openvino import write_preprocessor_config

    nested = {"image_processor": {"size": {"shortest_edge": 128}, "crop_size": {"height": 128, "width": 128}}}
    (tmp_path / "processor_config.json").write_text(json.dumps({**nested, "patch_size": 16}))
    write_preprocessor_config(tmp_path)
    flat = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert flat["crop_size"] == {"height": 128, "width": 128} and flat["patch_size"] == 16
    (tmp_path / "preprocessor_config.json").write_text("{}")  # the exporter's own file is left alone
    write_preprocessor_config(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == {}


def test_q4_0_gguf_is_llama_quantize_of_the_f32_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converter writes no q4_0: the f32 GGUF is converted (once) and handed to llama-quantize
    with type Q4_0; without the binary the bench says where it should be."""
    from llava_serve.tools.peers import llamacpp_convert as conv

    made: list[tuple[str, str]] = []

    def fake_text(model: Path, path: Path, variant: str, src: Path, python: str) -> None:
        made.append(("text", variant))
        path.write_bytes(b"GGUF " + variant.encode())

    def fake_vision(model: Path, path: Path, variant: str, src: Path, python: str) -> None:
        made.append(("vision", variant))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF mmproj")

    calls: list[list[str]] = []

    def fake_run(argv: list[str], log: Path, cwd: Path) -> None:
        calls.append(argv)
        Path(argv[2]).write_bytes(Path(argv[1]).read_bytes().replace(b"f32", b"q4_0"))

    monkeypatch.setattr(conv, "_convert_text", fake_text)
    monkeypatch.setattr(conv, "_convert_vision", fake_vision)
    monkeypatch.setattr(conv, "_run", fake_run)
    monkeypatch.setattr(conv, "classic_copy", lambda model, out: model)
    out = tmp_path / "gguf"
    with pytest.raises(SystemExit, match="llama-quantize not found"):
        conv.convert(tmp_path, out, "q4_0", tmp_path, "python", tmp_path / "missing" / "llama-quantize")
    quantize = tmp_path / "llama-quantize"
    quantize.write_text("")
    text, mmproj = conv.convert(tmp_path, out, "q4_0", tmp_path, "python", quantize)
    assert made == [("text", "f32"), ("vision", "f32")]  # only the f32 file is converted
    f32, _ = conv.gguf_paths(out, "f32")
    assert calls == [[str(quantize), str(f32), str(text.with_suffix(".part")), "Q4_0"]]
    assert text.read_bytes() == b"GGUF q4_0" and mmproj.is_file()
    conv.convert(tmp_path, out, "q4_0", tmp_path, "python", quantize)  # done once
    assert len(calls) == 1
