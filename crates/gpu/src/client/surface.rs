//! Remote surfaces: presented frames go to the GPU server's viewer.

use super::*;

/// The configuration and frame texture of a remote surface.
#[derive(Debug)]
pub(crate) struct SurfaceState {
    pub(crate) texture: Id,
}

/// A surface whose frames go to the server's viewer.
#[derive(Debug)]
pub struct RSurface {
    pub(crate) c: Arc<Conn>,
    pub(crate) state: Mutex<Option<SurfaceState>>,
}

impl Drop for RSurface {
    fn drop(&mut self) {
        if let Some(s) = self.state.lock().expect("surface").take() {
            self.c.send(&Request::Drop { id: s.texture }, &[]);
        }
    }
}

const SURFACE_FORMATS: [wgt::TextureFormat; 4] = [
    wgt::TextureFormat::Rgba8Unorm,
    wgt::TextureFormat::Rgba8UnormSrgb,
    wgt::TextureFormat::Bgra8Unorm,
    wgt::TextureFormat::Bgra8UnormSrgb,
];

impl SurfaceInterface for RSurface {
    fn get_capabilities(&self, _adapter: &DispatchAdapter) -> wgt::SurfaceCapabilities {
        wgt::SurfaceCapabilities {
            formats: SURFACE_FORMATS.to_vec(),
            present_modes: vec![wgt::PresentMode::Fifo],
            alpha_modes: vec![wgt::CompositeAlphaMode::Opaque],
            usages: wgt::TextureUsages::RENDER_ATTACHMENT
                | wgt::TextureUsages::COPY_SRC
                | wgt::TextureUsages::COPY_DST,
            ..Default::default()
        }
    }

    fn configure(&self, _device: &DispatchDevice, config: &wgpu::SurfaceConfiguration) {
        if !SURFACE_FORMATS.contains(&config.format) {
            unsupported("surface formats other than 8-bit RGBA or BGRA");
        }
        let id = self.c.id();
        self.c.send(
            &Request::CreateTexture {
                id,
                desc: wgt::TextureDescriptor {
                    label: Some("remote surface".into()),
                    size: wgt::Extent3d {
                        width: config.width,
                        height: config.height,
                        depth_or_array_layers: 1,
                    },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgt::TextureDimension::D2,
                    format: config.format,
                    usage: config.usage | wgt::TextureUsages::COPY_SRC,
                    view_formats: config.view_formats.clone(),
                },
            },
            &[],
        );
        let old = self
            .state
            .lock()
            .expect("surface")
            .replace(SurfaceState { texture: id });
        if let Some(old) = old {
            self.c.send(&Request::Drop { id: old.texture }, &[]);
        }
    }

    fn get_current_texture(
        &self,
    ) -> (
        Option<DispatchTexture>,
        wgt::SurfaceStatus,
        DispatchSurfaceOutputDetail,
    ) {
        let texture = self
            .state
            .lock()
            .expect("surface")
            .as_ref()
            .map(|s| s.texture)
            .expect("remote surface used before configure()");
        (
            Some(DispatchTexture::custom(RTexture {
                c: self.c.clone(),
                id: texture,
                owned: false,
            })),
            wgt::SurfaceStatus::Good,
            DispatchSurfaceOutputDetail::custom(RSurfaceOutput { texture }),
        )
    }
}

/// The frame handed out by `get_current_texture`.
#[derive(Debug)]
pub struct RSurfaceOutput {
    pub(crate) texture: Id,
}

impl SurfaceOutputDetailInterface for RSurfaceOutput {
    fn texture_discard(&self) {}
    fn texture_release(&self) {}
}
