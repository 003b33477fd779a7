"""The seed tutorial's own Python client, generated from the seed's user.proto, works unchanged.

The client runs in a subprocess: its generated `user_pb2` registers `user.proto` in the default
descriptor pool, which would clash with Parley's `parley.proto.user_pb2` in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from parley.proto import user_pb2, user_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_DIR = REPO_ROOT.parent / "shared" / "seed"
CALL_TIMEOUT = 10.0
RUN_TIMEOUT = 60.0

# The tutorial's client.py and its AuthInterceptor. Each change is marked `Deviation:` with its
# reason: the seed README's ClientCallDetails fix, the address and token of the stack under test,
# and data this stack has (an existing id, a unique email) instead of the tutorial's fixed values.
SEED_CLIENT = """\
# client.py - gRPC 客户端
import collections
import os
import sys

import grpc
import user_pb2
import user_pb2_grpc


# Deviation (the seed README's fix): grpc.ClientCallDetails takes no arguments on current
# grpcio, so the new call details are a namedtuple that also subclasses it.
class _ClientCallDetails(
    collections.namedtuple(
        '_ClientCallDetails',
        ('method', 'timeout', 'metadata', 'credentials', 'wait_for_ready', 'compression'),
    ),
    grpc.ClientCallDetails,
):
    pass


# 客户端拦截器:添加认证 Token
class AuthInterceptor(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = list(client_call_details.metadata or [])
        # Deviation: the token comes from PARLEY_TOKEN instead of 'token123'.
        metadata.append(('authorization', 'Bearer ' + os.environ['PARLEY_TOKEN']))  # 添加认证头
        new_details = _ClientCallDetails(
            client_call_details.method, client_call_details.timeout,
            metadata, client_call_details.credentials, None, None,
        )
        return continuation(new_details, request)

def run():
    # Deviation: the address comes from PARLEY_USER_ADDR and the interceptor is attached.
    channel = grpc.insecure_channel(os.environ['PARLEY_USER_ADDR'])  # 连接服务器
    channel = grpc.intercept_channel(channel, AuthInterceptor())
    stub = user_pb2_grpc.UserServiceStub(channel)  # 创建客户端存根

    # 调用 GetUser(像调用本地函数一样!)
    # Deviation: an id that exists on this stack instead of 1.
    response = stub.GetUser(user_pb2.GetUserRequest(id=int(sys.argv[1])))  # 发送请求
    print(f"用户: {response.user.name}, 邮箱: {response.user.email}")

    # 调用 CreateUser
    response = stub.CreateUser(user_pb2.CreateUserRequest(
        name="李四",
        email=sys.argv[2],  # Deviation: a unique email instead of li@example.com.
        age=30,
    ))
    print(f"创建成功: {response.success}")
    print(f"id: {response.user.id}")  # Deviation: so that the test can clean up.

if __name__ == '__main__':
    run()
"""


@pytest.fixture
def seed_dir() -> Path:
    # The tutorial's own files sit next to the repository only in Parley's workspace and CI; a
    # clone from elsewhere has no seed to generate a client from (tests/contract still checks
    # proto/ against the recorded seed contract there).
    if not (SEED_DIR / "user.proto").is_file():
        pytest.skip(
            f"no seed tutorial to build its client from: {SEED_DIR / 'user.proto'} is absent "
            "(it sits next to the clone only in Parley's workspace)"
        )
    return SEED_DIR


def _generate(seed_dir: Path, proto: str, into: Path) -> None:
    """The tutorial's protoc command for one of the seed's protos, with the seed directory as
    the proto path; checks that both generated modules exist."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--python_out=.",
            "--grpc_python_out=.",
            f"--proto_path={seed_dir}",
            proto,
        ],
        cwd=into,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, f"protoc failed on the seed's {proto}:\n{result.stderr}"
    stem = proto.removesuffix(".proto")
    assert (into / f"{stem}_pb2.py").is_file() and (into / f"{stem}_pb2_grpc.py").is_file()


@pytest.fixture
def seed_client_dir(seed_dir: Path, tmp_path: Path) -> Path:
    """A directory with the tutorial's generated user_pb2 modules and its client.py."""
    _generate(seed_dir, "user.proto", tmp_path)
    (tmp_path / "client.py").write_text(SEED_CLIENT, encoding="utf-8")
    return tmp_path


def test_the_seed_tutorial_client_gets_and_creates_users(
    seed_client_dir: Path,
    user_addr: str,
    token: str,
    users: user_pb2_grpc.UserServiceStub,
    auth: tuple[tuple[str, str], ...],
    create_user: Callable[..., user_pb2.User],
    new_email: Callable[[], str],
    created_ids: list[int],
) -> None:
    existing = create_user(name="张三", age=25)
    email = new_email()
    env = {
        **os.environ,
        "PARLEY_USER_ADDR": user_addr,
        "PARLEY_TOKEN": token,
        "PYTHONIOENCODING": "utf-8",
    }

    result = subprocess.run(
        [sys.executable, "client.py", str(existing.id), email],
        cwd=seed_client_dir,
        env=env,
        capture_output=True,
        encoding="utf-8",
        timeout=RUN_TIMEOUT,
    )

    assert result.returncode == 0, f"the seed client failed:\n{result.stdout}{result.stderr}"
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert lines[0] == f"用户: 张三, 邮箱: {existing.email}"
    assert lines[1] == "创建成功: True"
    label, _, new_id = lines[2].partition(": ")
    assert label == "id" and new_id.isdigit()
    created_ids.append(int(new_id))

    stored = users.GetUser(
        user_pb2.GetUserRequest(id=int(new_id)), metadata=auth, timeout=CALL_TIMEOUT
    ).user
    assert (stored.name, stored.email, stored.age) == ("李四", email, 30)


# A client of the tutorial's chat.proto: the tutorial shows only the service, so this is the
# usual grpcio pattern for a bidirectional stream, with the seed's interceptor idea (a bearer
# token on the call). It knows only `user` and `text`, so it chats in the default room.
SEED_CHAT_CLIENT = """\
import os
import sys

import grpc
import chat_pb2
import chat_pb2_grpc


def messages():
    yield chat_pb2.ChatMessage(user="冒名顶替", text=sys.argv[1])


def run():
    channel = grpc.insecure_channel(os.environ['PARLEY_CHAT_ADDR'])
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    metadata = [('authorization', 'Bearer ' + os.environ['PARLEY_TOKEN'])]
    replies = stub.StreamChat(messages(), metadata=metadata, timeout=30)
    for reply in replies:
        print(f"{reply.user}: {reply.text}")
        if reply.text == sys.argv[1]:
            replies.cancel()
            break

if __name__ == '__main__':
    run()
"""


@pytest.fixture
def seed_chat_client_dir(seed_dir: Path, tmp_path: Path) -> Path:
    """A directory with chat_pb2 modules generated from the seed's chat.proto, and a client."""
    _generate(seed_dir, "chat.proto", tmp_path)
    (tmp_path / "chat_client.py").write_text(SEED_CHAT_CLIENT, encoding="utf-8")
    return tmp_path


def test_a_client_of_the_seed_chat_proto_chats_in_the_default_room(
    seed_chat_client_dir: Path,
    chat_addr: str,
    create_user: Callable[..., user_pb2.User],
    sign_token: Callable[[str], str],
) -> None:
    speaker = create_user(name="王五")
    text = f"大家好 {uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PARLEY_CHAT_ADDR": chat_addr,
        "PARLEY_TOKEN": sign_token(str(speaker.id)),
        "PYTHONIOENCODING": "utf-8",
    }

    result = subprocess.run(
        [sys.executable, "chat_client.py", text],
        cwd=seed_chat_client_dir,
        env=env,
        capture_output=True,
        encoding="utf-8",
        timeout=RUN_TIMEOUT,
    )

    assert result.returncode == 0, f"the seed chat client failed:\n{result.stdout}{result.stderr}"
    # Its own message comes back under the name UserService has, not the one it claimed.
    assert result.stdout.splitlines()[-1] == f"王五: {text}"
